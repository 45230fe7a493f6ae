"""Bundled datasets, the loader's protocols and errors, and the importer (small files under tmp_path)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from padrec import PadrecError
from padrec.data.dataset import Dataset, ItemInfo, UserSplit, list_datasets, load_dataset, load_provided_sids
from padrec.data.importer import ImportOptions, import_dataset

REPO_DATA = Path(__file__).resolve().parents[1] / "data"

EXPECTED = {
    "beauty": dict(protocol="time", users=19383, items=12035, interactions=138870, train_interactions=122241,
                   valid_interactions=9316, test_interactions=7313, users_with_valid=4295, users_with_test=3553),
    "games": dict(protocol="time", users=49156, items=17332, interactions=342329, train_interactions=299987,
                  valid_interactions=22609, test_interactions=19733, users_with_valid=9609, users_with_test=8696),
    "toys": dict(protocol="loo", users=19412, items=11924, interactions=167597, train_interactions=128773,
                 valid_interactions=19412, test_interactions=19412, users_with_valid=19412, users_with_test=19412),
    "yelp": dict(protocol="loo", users=30431, items=20033, interactions=316354, train_interactions=255492,
                 valid_interactions=30431, test_interactions=30431, users_with_valid=30431, users_with_test=30431),
}


# ------------------------------------------------------------------------------------------ bundled datasets


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_counts(name):
    ds = load_dataset(name, REPO_DATA)
    stats = ds.stats()
    for key, value in EXPECTED[name].items():
        assert stats[key] == value, (name, key)
    assert ds.meta["counts"] == stats
    assert ds.meta["max_history_default"] == 20
    assert all(it.title for it in ds.items)
    assert all(0 <= i < ds.num_items for u in ds.users for i in u.train + u.valid + u.test)
    sids = load_provided_sids(ds)
    if name in ("beauty", "games"):
        assert sids is not None and len(sids) == ds.num_items and all(len(c) == 4 for c in sids)
    else:
        assert sids is None


def test_bundled_listed_and_text_cleaned():
    assert set(EXPECTED) <= set(list_datasets(REPO_DATA))
    toys = load_dataset("toys", REPO_DATA)
    assert not any("&amp;" in it.title or "&quot;" in it.title for it in toys.items)
    games = load_dataset("games", REPO_DATA)
    assert all(len(c) < 60 for it in games.items for c in it.categories)
    assert all(len(it.categories) <= 8 for it in games.items)
    beauty = load_dataset("beauty", REPO_DATA)
    assert not any(it.brand and it.brand.startswith("brand_") and it.brand[6:].isdigit() for it in beauty.items)


def test_unknown_dataset(tmp_path):
    with pytest.raises(PadrecError, match="unknown dataset 'nope'"):
        load_dataset("nope", tmp_path)
    with pytest.raises(PadrecError, match="unknown dataset"):
        load_dataset("no_such_dataset", REPO_DATA)


# ------------------------------------------------------------------------------------------ eval_cases semantics


def _toy(protocol: str) -> Dataset:
    items = [ItemInfo(i, i, f"item {i}") for i in range(8)]
    users = [
        UserSplit("a", (0, 1, 2), (3,), (4, 5, 4)),
        UserSplit("b", (1,), (), (6,)),
        UserSplit("c", (), (2,), (3,)),
        UserSplit("d", (0, 1), (2,), ()),
    ]
    return Dataset("toy", protocol, items, users)


def test_eval_cases_time():
    ds = _toy("time")
    test = {c.user: c for c in ds.eval_cases("test")}
    assert set(test) == {"a", "b", "c"}  # d has no test target
    assert test["a"].history == (0, 1, 2, 3)  # train + valid
    assert test["a"].targets == (4, 5)  # a set: duplicates collapsed
    assert test["c"].history == (2,)
    valid = {c.user: c for c in ds.eval_cases("valid")}
    assert set(valid) == {"a", "d"}  # b: no valid item; c: empty train history
    assert valid["a"].history == (0, 1, 2) and valid["a"].targets == (3,)
    assert ds.eval_cases("test", max_history=2)[0].history == (2, 3)
    with pytest.raises(PadrecError):
        ds.eval_cases("train")


def test_eval_cases_loo_on_bundled():
    ds = load_dataset("toys", REPO_DATA)
    cases = ds.eval_cases("test")
    assert len(cases) == 19412
    assert all(len(c.targets) == 1 for c in cases)
    u = ds.users[0]
    assert cases[0].history == u.train + u.valid and cases[0].targets == u.test
    v = ds.eval_cases("valid", max_history=20)
    assert v[0].history == u.train[-20:] and v[0].targets == u.valid


# ------------------------------------------------------------------------------------------ importer


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


ITEMS_CSV = """id,title,categories,brand,description
i1,Red Ball,Toys|Balls,Acme,A red ball
i2,Blue Car &amp; Co,Toys|Cars,,
i3,Green Kite,Toys||Outdoor,Kites Inc,
i4,Unused Item,,,
"""

# u1: 4 interactions given out of order; u2: 3; u3: only 2 (all train under loo)
INTERACTIONS_CSV = """user,item,timestamp
u1,i2,2
u1,i1,1
u2,i1,3
u1,i3,2014-01-01T00:00:00Z
u2,i2,4
u3,i3,5
u2,i3,6
u3,i1,7
u1,i1,1500000000.5
"""


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_import_csv_loo(tmp_path):
    items = _write(tmp_path / "items.csv", ITEMS_CSV)
    inter = _write(tmp_path / "inter.csv", INTERACTIONS_CSV)
    root = tmp_path / "root"
    out = import_dataset("mine", inter, items, split="loo", root=root)
    assert out == root / "mine"
    ds = load_dataset("mine", root)
    assert ds.protocol == "loo"
    assert [it.raw_id for it in ds.items] == ["i1", "i2", "i3", "i4"]
    assert ds.items[0].categories == ("Toys", "Balls") and ds.items[0].brand == "Acme"
    assert ds.items[1].brand is None and ds.items[2].categories == ("Toys", "Outdoor")
    users = {u.user: u for u in ds.users}
    assert [u.user for u in ds.users] == ["u1", "u2", "u3"]
    # u1 sorted by time: i1 (1), i2 (2), i3 (2014), i1 (1.5e9)
    assert users["u1"] == UserSplit("u1", (0, 1), (2,), (0,))
    assert users["u2"] == UserSplit("u2", (0,), (1,), (2,))
    assert users["u3"] == UserSplit("u3", (2, 0), (), ())
    assert ds.meta["counts"] == ds.stats() and ds.stats()["interactions"] == 9
    with gzip.open(out / "items.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    assert first["description"] == "A red ball"
    assert [p.name for p in root.iterdir()] == ["mine"]  # no temp folder left


def test_import_jsonl_time(tmp_path):
    items = _jsonl(tmp_path / "items.jsonl", [
        {"id": 10, "title": "Ten", "categories": ["A", "B", "A"]},
        {"id": "20", "title": "Twenty", "categories": "C|D", "brand": "X"},
        {"id": 30, "title": "Thirty"},
    ])
    rows = [{"user": "a", "item": 10, "timestamp": t} for t in (1, 2, 3, 4)]
    rows += [{"user": "b", "item": 20, "timestamp": t} for t in (5, 6, 7)]
    rows += [{"user": "b", "item": "30", "timestamp": 9}, {"user": "a", "item": 30, "timestamp": 8},
             {"user": 7, "item": 20, "timestamp": 10}]
    inter = _jsonl(tmp_path / "inter.jsonl", rows)
    root = tmp_path / "root"
    import_dataset("timed", inter, items, split="time", root=root)
    ds = load_dataset("timed", root)
    assert ds.protocol == "time"
    assert ds.items[0].categories == ("A", "B") and ds.items[1].categories == ("C", "D")
    # 10 timestamps 1..10: q80 = 9, q90 = 10 -> train t < 9, valid t == 9, test t == 10
    users = {u.user: u for u in ds.users}
    assert users["a"] == UserSplit("a", (0, 0, 0, 0, 2), (), ())
    assert users["b"] == UserSplit("b", (1, 1, 1), (2,), ())
    assert users["7"] == UserSplit("7", (), (), (1,))
    st = ds.stats()
    assert (st["train_interactions"], st["valid_interactions"], st["test_interactions"]) == (8, 1, 1)
    assert ds.meta["counts"] == st
    # the test query of user 7 has no history -> skipped
    assert ds.eval_cases("test") == []
    assert [c.targets for c in ds.eval_cases("valid")] == [(2,)]


def test_import_order_column_and_overwrite(tmp_path):
    items = _write(tmp_path / "items.csv", "id,title\na,A\nb,B\nc,C\n")
    inter = _write(tmp_path / "inter.csv", "user,item,order\nx,c,3\nx,a,1\nx,b,2\nx,a,2\n")
    root = tmp_path / "root"
    import_dataset("ord", inter, items, root=root)
    # stable: (a,1), (b,2), (a,2), (c,3)
    assert load_dataset("ord", root).users[0] == UserSplit("x", (0, 1), (0,), (2,))
    with pytest.raises(PadrecError, match="already exists"):
        import_dataset("ord", inter, items, root=root)
    with pytest.raises(PadrecError, match="timestamp"):
        import_dataset("ord2", inter, items, split="time", root=root)
    inter2 = _write(tmp_path / "inter2.csv", "user,item,order\ny,a,1\ny,b,2\ny,c,3\ny,a,4\n")
    import_dataset("ord", inter2, items, root=root, overwrite=True)
    assert load_dataset("ord", root).users[0].user == "y"
    assert sorted(p.name for p in root.iterdir()) == ["ord"]


ITEMS_OK = "id,title\na,A\nb,B\n"
INTER_OK = "user,item,timestamp\nu,a,1\nu,b,2\nu,a,3\n"


@pytest.mark.parametrize(
    "items_text, inter_text, kwargs, message",
    [
        (ITEMS_OK, "user,item\nu,a\n", {}, r"missing column\(s\) timestamp or order"),
        (ITEMS_OK, "user,timestamp\nu,1\n", {}, r"missing column\(s\) item"),
        ("name,title\nA,a\n", INTER_OK, {}, r"has no id column.*--item-id-col"),
        (ITEMS_OK, "user,item,timestamp\nu,a,1\nu,zzz,2\n", {"unknown_items": "error"},
         r"line 3: unknown item id 'zzz'.*--unknown-items drop"),
        ("id,title\na,A\nb,B\na,C\n", INTER_OK, {"duplicate_items": "error"},
         r"line 4: item 'a' again \(first on line 2\).*--duplicate-items first"),
        (ITEMS_OK, "user,item,timestamp\n", {}, r"no interactions left.*the file has no rows"),
        (ITEMS_OK, INTER_OK, {"split": "random"}, r"unknown split 'random'"),
        (ITEMS_OK, "user,item,timestamp\nu,a,yesterday\n", {"bad_rows": "error"},
         r"line 2: unreadable time \(expected a number or an ISO-8601 date\); pass --bad-rows drop"),
        (ITEMS_OK, "user,item,timestamp\nu,,1\n", {"bad_rows": "error"}, r"line 2: empty item"),
        (ITEMS_OK, "user,item,timestamp\nu,a,yesterday\nv,b,\n", {},
         r"all dropped: 1 unreadable time \(e.g. line 2\); 1 empty time \(e.g. line 3\)"),
    ],
)
def test_import_bad_input(tmp_path, items_text, inter_text, kwargs, message):
    items = _write(tmp_path / "items.csv", items_text)
    inter = _write(tmp_path / "inter.csv", inter_text)
    root = tmp_path / "root"
    split = kwargs.pop("split", "loo")
    with pytest.raises(PadrecError, match=message):
        import_dataset("bad", inter, items, split=split, root=root, options=ImportOptions(**kwargs))
    assert not (root / "bad").exists()
    assert not root.exists() or list(root.iterdir()) == []  # nothing half-written


def test_import_missing_files_and_bad_name(tmp_path):
    items = _write(tmp_path / "items.csv", ITEMS_OK)
    inter = _write(tmp_path / "inter.csv", INTER_OK)
    with pytest.raises(PadrecError, match="interactions file not found"):
        import_dataset("x", tmp_path / "missing.csv", items, root=tmp_path / "r")
    with pytest.raises(PadrecError, match="items file not found"):
        import_dataset("x", inter, tmp_path / "missing.jsonl", root=tmp_path / "r")
    with pytest.raises(PadrecError, match="invalid dataset name"):
        import_dataset("../escape", inter, items, root=tmp_path / "r")
    with pytest.raises(PadrecError, match="unsupported file type"):
        import_dataset("x", inter, _write(tmp_path / "items.txt", ITEMS_OK), root=tmp_path / "r")
    bad_json = _write(tmp_path / "inter.jsonl", '{"user": "u", "item": "a", "timestamp": 1}\n{oops\n')
    with pytest.raises(PadrecError, match="line 2: invalid JSON"):
        import_dataset("x", bad_json, items, root=tmp_path / "r")


def test_corrupt_items_file(tmp_path):
    items = _write(tmp_path / "items.csv", ITEMS_OK)
    inter = _write(tmp_path / "inter.csv", INTER_OK)
    root = tmp_path / "root"
    out = import_dataset("c", inter, items, root=root)
    # a realistically sized file, then truncated
    big = "".join(json.dumps({"id": i, "raw_id": str(i), "title": f"item number {i} " * 5}) + "\n" for i in range(2000))
    with gzip.open(out / "items.jsonl.gz", "wt") as f:
        f.write(big)
    data = (out / "items.jsonl.gz").read_bytes()
    (out / "items.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PadrecError, match="unreadable or corrupt"):
        load_dataset("c", root)
    (out / "items.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(PadrecError, match="unreadable or corrupt"):
        load_dataset("c", root)
