"""The importer on messy real-world input: each defect's outcome and its line in the import report; column mapping;
RecBole atomic files; the CLI's report, exit codes and overwrite protection; imported data through the pipeline."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from padrec import PadrecError
from padrec.cli import main
from padrec.data.dataset import load_dataset
from padrec.data.fields import ColumnMap
from padrec.data.importer import REPORT_FILE, ImportOptions, import_with_report

ITEMS = """id,title,categories,brand,description
a,Red Ball,Toys|Balls,Acme,
b,,Toys|Cars,,A small blue car with four wheels
c,,,,
d,Kite,Outdoor,,
d,Kite,Outdoor,,
e,Yo-yo,,,
e,Yo-yo (other row),,,
"""
# u1: a full history; u2: a duplicate row and an unknown item; u3: a single interaction
INTERACTIONS = """user,item,timestamp
u1,a,1
u1,b,2
u1,c,3
u1,d,4
u2,a,5
u2,a,5
u2,zzz,6
u2,e,7
u2,d,8
u3,b,9
"""


def _files(tmp_path, items=ITEMS, inter=INTERACTIONS, names=("items.csv", "inter.csv")):
    ip, xp = tmp_path / names[0], tmp_path / names[1]
    for path, text in ((ip, items), (xp, inter)):
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return xp, ip


def _import(tmp_path, name="messy", **opts):
    inter, items = _files(tmp_path)
    return import_with_report(name, inter, items, root=tmp_path / "root", options=ImportOptions(**opts))


def test_each_defect_is_kept_or_dropped_and_reported(tmp_path):
    path, rep = _import(tmp_path)
    ds = load_dataset("messy", path.parent)
    assert [it.raw_id for it in ds.items] == ["a", "b", "c", "d", "e"]
    # no title: the description (then categories, brand) describes the item; no text at all: its id
    b, c = ds.items[1], ds.items[2]
    assert b.title == "" and b.text() == "A small blue car with four wheels. Categories: Toys, Cars"
    assert c.text() == "Item c"
    assert ds.items[4].title == "Yo-yo"  # the first of two rows with one id and different fields
    it = rep.items
    assert (it.read, it.kept) == (7, 5)
    assert it.dropped == {"repeats an earlier row of the same item": 1,
                          "same id as an earlier row, other fields: the first row is kept": 1}
    assert it.changed == {"no title: described by its description, categories or brand": 1,
                          "no title and no other text: described by its id": 1}
    x = rep.interactions
    assert (x.read, x.kept) == (10, 8)
    assert x.dropped == {"repeats an earlier row (same user, item and time)": 1, "item not in the items file": 1}
    assert x.examples["item not in the items file"] == ["line 8: item 'zzz'"]
    users = {u.user: u for u in ds.users}
    assert users["u2"].train == (0,) and users["u2"].test == (3,)  # a, (a dropped), (zzz dropped), e, d
    assert users["u3"].train == (1,)  # a single interaction: kept, train only
    assert any("1 user(s) have a single interaction" in n for n in rep.notes)
    saved = json.loads((path / REPORT_FILE).read_text())
    assert saved == json.loads(json.dumps(rep.to_dict()))
    assert json.loads((path / "meta.json").read_text())["import_report"] == REPORT_FILE


def test_policies_that_keep_add_or_refuse(tmp_path):
    _, rep = _import(tmp_path, "keep", duplicate_interactions="keep", unknown_items="add")
    ds = load_dataset("keep", tmp_path / "root")
    assert ds.items[-1].raw_id == "zzz" and ds.items[-1].text() == "Item zzz"
    assert rep.items.added == {"named only by the interactions (no text: described by its id)": 1}
    assert rep.interactions.kept == 10 and rep.interactions.dropped == {}
    _, rep = _import(tmp_path, "min2", min_user_interactions=2)
    assert rep.users.dropped == {"fewer than 2 interactions (--min-user-interactions)": 1}
    assert "u3" not in {u.user for u in load_dataset("min2", tmp_path / "root").users}
    for opts, message in [({"unknown_items": "error"}, r"line 8: unknown item id 'zzz'.*--unknown-items drop"),
                          ({"duplicate_items": "error"}, r"line 8: item 'e' again \(first on line 7\)")]:
        with pytest.raises(PadrecError, match=message):
            _import(tmp_path, "refused", **opts)
    assert not (tmp_path / "root" / "refused").exists()
    with pytest.raises(PadrecError, match="unknown_items must be one of drop, add, error"):
        ImportOptions(unknown_items="ignore")


def test_non_utf8_bytes(tmp_path):
    items = "id,title\na,Caf\xe9 cr\xe8me\nb,Plain\n".encode("cp1252")
    inter = "user,item,timestamp\nu,a,1\nu,b,2\nu,a,3\n"
    xp, ip = _files(tmp_path, items, inter)
    path, rep = import_with_report("bytes", xp, ip, root=tmp_path / "root")
    assert load_dataset("bytes", path.parent).items[0].title == "Caf\ufffd cr\ufffdme"
    assert any("1 line(s) held bytes that are not valid utf-8 (lines 2)" in n and "--encoding" in n
               for n in rep.notes)
    with pytest.raises(PadrecError, match=r"line 2: bytes that are not valid utf-8.*--encoding"):
        import_with_report("strict", xp, ip, root=tmp_path / "root", options=ImportOptions(encoding_errors="strict"))
    path, rep = import_with_report("cp", xp, ip, root=tmp_path / "root", options=ImportOptions(encoding="cp1252"))
    assert load_dataset("cp", path.parent).items[0].title == "Café crème" and rep.notes == []


def test_ids_that_are_numbers_in_one_file_and_text_in_the_other(tmp_path):
    items = "".join(json.dumps(r) + "\n" for r in [{"id": 5, "title": "Five"}, {"id": 7, "title": "Seven"},
                                                    {"id": "007", "title": "Bond"}])
    inter = "user,item,timestamp\n1,5.0,1\n1,7,2\n1,007,3\n2,5,4\n"  # a pandas export writes 5 as 5.0
    xp, ip = _files(tmp_path, items, inter, names=("items.jsonl", "inter.csv"))
    path, rep = import_with_report("nums", xp, ip, root=tmp_path / "root")
    users = {u.user: u for u in load_dataset("nums", path.parent).users}
    assert users["1"].train + users["1"].valid + users["1"].test == (0, 1, 2)  # "007" stays apart from 7
    assert rep.interactions.changed == {"item id matched an items-file id as a number": 1}
    assert rep.interactions.examples["item id matched an items-file id as a number"] == ["line 2: '5.0' -> '5'"]


def test_column_mapping_and_recbole_atomic_files(tmp_path):
    inter = "customer\tproduct\twhen\nx\tp1\t2020-01-01\nx\tp2\t2020-01-02\nx\tp1\t2020-01-03\n"
    items = "sku\tlabel\nP1\tOne\np1\tone\np2\tTwo\n"
    xp, ip = _files(tmp_path, items, inter, names=("items.tsv", "inter.tsv"))
    cols = ColumnMap(user="customer", item="product", time="when", item_id="sku", title="label")
    path, rep = import_with_report("mapped", xp, ip, root=tmp_path / "root", options=ImportOptions(columns=cols))
    ds = load_dataset("mapped", path.parent)
    assert [it.raw_id for it in ds.items] == ["P1", "p1", "p2"]  # ids are case-sensitive
    assert ds.users[0].train == (1,) and ds.users[0].test == (1,)
    assert rep.files["interactions"]["columns_used"] == {"user": "customer", "item": "product", "time": "when"}
    with pytest.raises(PadrecError, match=r"no column 'userid' \(given for user; found: customer, product, when\)"):
        import_with_report("m2", xp, ip, root=tmp_path / "root", options=ImportOptions(columns=replace(cols, user="userid")))
    # RecBole: name:type headers, token_seq fields are space-separated lists, extra columns are ignored
    inter = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
             "1\t10\t5\t100.0\n1\t11\t4\t101.0\n1\t10\t3\t102.0\n")
    items = "item_id:token\tmovie_title:token_seq\tclass:token_seq\n10\tToy Story\tAnimation Comedy\n11\tHeat\tCrime\n"
    xp, ip = _files(tmp_path, items, inter, names=("ml.item", "ml.inter"))
    path, rep = import_with_report("ml", xp, ip, root=tmp_path / "root")
    ds = load_dataset("ml", path.parent)
    assert ds.items[0].title == "Toy Story" and ds.items[0].categories == ("Animation", "Comedy")
    assert rep.files["interactions"]["format"] == "recbole"
    assert rep.files["interactions"]["ignored_columns"] == ["rating"]
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id\titem_id\n1\t10\n")
    with pytest.raises(PadrecError, match=r"RecBole header field 'user_id' is not 'name:type'"):
        import_with_report("bad", bad, ip, root=tmp_path / "root")


def test_cli_prints_the_report_and_refuses_with_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PADREC_DATA_DIR", str(tmp_path / "root"))
    inter, items = _files(tmp_path)
    args = ["data", "import", "--name", "cli", "--interactions", str(inter), "--items", str(items)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "item not in the items file" in out and "import report" in out and REPORT_FILE in out
    before = (tmp_path / "root" / "cli" / "users.jsonl.gz").read_bytes()
    assert main(args + ["--unknown-items", "add"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "root" / "cli" / "users.jsonl.gz").read_bytes() == before  # untouched without --overwrite
    assert main(args + ["--unknown-items", "error", "--overwrite"]) == 2
    assert "unknown item id 'zzz'" in capsys.readouterr().err
    assert (tmp_path / "root" / "cli" / "users.jsonl.gz").read_bytes() == before  # a refused overwrite keeps it
    assert main(args + ["--user-col", "nobody", "--overwrite"]) == 2
    assert "no column 'nobody'" in capsys.readouterr().err
    assert main(args + ["--unknown-items", "add", "--overwrite"]) == 0
    assert load_dataset("cli").items[-1].raw_id == "zzz"


def _recbole_files(folder):
    """A RecBole atomic dataset: 4 kinds of 8 items; each user walks one kind in order (predictable next item)."""
    rng = random.Random(0)
    kinds = ["mug", "lamp", "sock", "book"]
    items = ["item_id:token\ttitle:token_seq\tcategories:token_seq"]
    items += [f"{g * 8 + j}\t{kinds[g]} number {j}\tHome {kinds[g].title()}" for g in range(4) for j in range(8)]
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(40):
        g, start = u % 4, rng.randrange(8)
        inter += [f"{u}\t{g * 8 + (start + k) % 8}\t{1000 * u + k}" for k in range(6)]
    (folder / "shop.item").write_text("\n".join(items) + "\n")
    (folder / "shop.inter").write_text("\n".join(inter) + "\n")
    return folder / "shop.inter", folder / "shop.item"


def _other_columns_csv(folder):
    """The same shape as a CSV with its own column names (customer, sku, ordered_at, product_name)."""
    inter, items = _recbole_files(folder)
    rows = [line.split("\t") for line in inter.read_text().splitlines()[1:]]
    (folder / "orders.csv").write_text("customer,sku,ordered_at\n" + "".join(
        f"c{u},S{i},{int(float(t))}\n" for u, i, t in rows))
    products = [line.split("\t") for line in items.read_text().splitlines()[1:]]
    (folder / "products.csv").write_text("sku,product_name\n" + "".join(f"S{i},{t}\n" for i, t, _ in products))
    return folder / "orders.csv", folder / "products.csv"


@pytest.mark.parametrize("source", ["recbole", "csv"])
def test_imported_data_tokenizes_trains_and_recommends(tmp_path, monkeypatch, source):
    monkeypatch.setenv("PADREC_DATA_DIR", str(tmp_path / "root"))
    monkeypatch.setenv("PADREC_CACHE_DIR", str(tmp_path / "cache"))
    if source == "recbole":
        inter, items = _recbole_files(tmp_path)
        extra = []
    else:
        inter, items = _other_columns_csv(tmp_path)
        extra = ["--user-col", "customer", "--item-col", "sku", "--time-col", "ordered_at", "--item-id-col", "sku",
                 "--title-col", "product_name"]
    assert main(["data", "import", "--name", "shop", "--interactions", str(inter), "--items", str(items), *extra]) == 0
    run = tmp_path / "run"
    assert main(["tokenize", "--dataset", "shop", "--run", str(run), "--levels", "2", "--codebook-size", "4"]) == 0
    assert main(["train-target", "--run", str(run), "--preset", "tiny", "--epochs", "1", "--threads", "1"]) == 0
    out = tmp_path / "recs.jsonl"
    assert main(["recommend", "--run", str(run), "--out", str(out), "--limit", "5", "--mode", "beam",
                 "--beam-size", "5", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    known = {it.raw_id for it in load_dataset("shop").items}
    assert len(rows) == 5 and all(len(r["items"]) == 5 and set(r["items"]) <= known for r in rows)
