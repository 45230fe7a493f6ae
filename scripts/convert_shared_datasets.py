#!/usr/bin/env python
"""One-time conversion of the shared benchmark datasets into padrec's on-disk format (see data/README.md).

    python scripts/convert_shared_datasets.py [SOURCE_ROOT] [--out data] [--only beauty games ...]

SOURCE_ROOT (default: ../shared/datasets relative to the repository root) holds beauty/, games/, toys/, yelp/ as
described by their SOURCE.md files.  For each dataset this writes data/<name>/ with meta.json, items.jsonl.gz,
users.jsonl.gz, provided_sids.json.gz (Beauty, Games) and SOURCE.md (the source's, plus a "Converted format" section).

This script is the only place in the repository that unpickles anything: the source `.npy` files are pickled 0-d object
arrays.  Before `np.load(..., allow_pickle=True)` each file's pickle stream is scanned with pickletools and refused
unless the only globals it references are numpy's array reconstruction (`_reconstruct`, `ndarray`, `dtype`) and
`builtins.set`.
"""

from __future__ import annotations

import argparse
import html
import json
import pickletools
import re
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from padrec import PadrecError  # noqa: E402
from padrec.data.dataset import Dataset, ItemInfo, UserSplit, load_dataset  # noqa: E402
from padrec.data.writer import install_dir, make_temp_dir, write_dataset_dir  # noqa: E402

DATASETS = ("beauty", "games", "toys", "yelp")

# Expected counts, from each SOURCE.md ("Counts (measured here)").
EXPECTED = {
    "beauty": dict(users=19383, items=12035, interactions=138870, train_interactions=122241,
                   valid_interactions=9316, test_interactions=7313, users_with_valid=4295, users_with_test=3553),
    "games": dict(users=49156, items=17332, interactions=342329, train_interactions=299987,
                  valid_interactions=22609, test_interactions=19733, users_with_valid=9609, users_with_test=8696),
    "toys": dict(users=19412, items=11924, interactions=167597, train_interactions=128773,
                 valid_interactions=19412, test_interactions=19412, users_with_valid=19412, users_with_test=19412),
    "yelp": dict(users=30431, items=20033, interactions=316354, train_interactions=255492,
                 valid_interactions=30431, test_interactions=30431, users_with_valid=30431, users_with_test=30431),
}

LICENCE = {
    "beauty": "research use only: AtSpeed repo (no LICENSE; 'NUS (c) NExT++'), Amazon review data (McAuley, UCSD)",
    "games": "research use only: AtSpeed repo (no LICENSE; 'NUS (c) NExT++'), Amazon review data (McAuley, UCSD)",
    "toys": "research use only: TransRec repo (no LICENSE; 'NUS (c) NExT++'), P5 preprocessing, Amazon data (UCSD)",
    "yelp": "academic/non-commercial only: TransRec repo (no LICENSE), P5 preprocessing, Yelp Dataset Terms of Use",
}

GAMES_MAX_CATEGORY_LEN = 60  # Games category lists contain feature bullets; keep only short entries ...
GAMES_MAX_CATEGORIES = 8  # ... and at most this many

# ----------------------------------------------------------------------------------------------- safe loading

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "set"),
    ("__builtin__", "set"),
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def check_npy_pickle(path: Path) -> None:
    """Refuse a .npy whose embedded pickle references any global outside ALLOWED_GLOBALS."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise PadrecError(f"{path}: unsupported .npy format version {version}")
        stream = f.read()
    if not dtype.hasobject:
        return  # plain array: np.load needs no pickle
    # Track which values are strings well enough to resolve STACK_GLOBAL (module and name are the two values pushed
    # just before it, possibly fetched from the memo); anything not provably a pair of constant strings is refused.
    recent: list[str | None] = []  # values pushed since the last other opcode (None: not a string constant)
    memo: dict[int, str | None] = {}
    try:
        for op, arg, pos in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if (module, attr) not in ALLOWED_GLOBALS:
                    raise PadrecError(f"{path}: pickle references {module}.{attr} at byte {pos}; refusing to load")
                recent = [None]
            elif name == "STACK_GLOBAL":
                pair = tuple(recent[-2:])
                if len(pair) < 2 or pair not in ALLOWED_GLOBALS:
                    what = ".".join(map(str, pair)) if len(pair) == 2 and None not in pair else "an unresolved name"
                    raise PadrecError(f"{path}: pickle references {what} at byte {pos}; refusing to load")
                recent = [None]
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise PadrecError(f"{path}: pickle uses extension registry opcode {name}; refusing to load")
            elif name in _STRING_OPS:
                recent.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(arg))
            elif name != "FRAME":
                recent = []
    except ValueError as e:
        raise PadrecError(f"{path}: malformed pickle stream: {e}") from e


def load_npy_dict(path: Path) -> dict:
    check_npy_pickle(path)
    obj = np.load(path, allow_pickle=True)
    if obj.shape != () or obj.dtype != object:
        raise PadrecError(f"{path}: expected a 0-d object array, got shape {obj.shape} dtype {obj.dtype}")
    value = obj.item()
    if not isinstance(value, dict):
        raise PadrecError(f"{path}: expected a pickled dict, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------- helpers


def clean_text(s) -> str:
    return " ".join(html.unescape(str(s)).split())


def clean_categories(cats, max_len: int | None = None, max_n: int | None = None) -> tuple[str, ...]:
    out: list[str] = []
    for c in cats or ():
        c = clean_text(c)
        if not c or c in out or (max_len is not None and len(c) >= max_len):
            continue
        out.append(c)
    return tuple(out[:max_n] if max_n is not None else out)


def clean_brand(b) -> str | None:
    if b is None:
        return None
    b = clean_text(b)
    if not b or re.fullmatch(r"brand_\d+", b):
        return None
    return b


def read_sequential_txt(path: Path, shift: int) -> dict[int, list[int]]:
    """`user item item ...` per line -> {user - shift: [item - shift, ...]}; fails on repeated users."""
    out: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                nums = [int(x) - shift for x in parts]
            except ValueError as e:
                raise PadrecError(f"{path} line {lineno}: not integers: {e}") from e
            if nums[0] in out:
                raise PadrecError(f"{path} line {lineno}: user {parts[0]} repeated")
            out[nums[0]] = nums[1:]
    return out


def check_dense(name: str, mapping: dict, n: int, what: str) -> None:
    keys = sorted(int(k) for k in mapping)
    if keys != list(range(n)):
        raise PadrecError(f"{name}: {what} keys are not exactly 0..{n - 1}")


_SID_RE = re.compile(r"^<([a-z])_(\d+)>$")


def parse_sids(path: Path, n_items: int) -> dict[int, list[int]]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    check_dense(path.name, raw, n_items, "semantic-ID")
    out = {}
    for k, toks in raw.items():
        codes = []
        for level, tok in enumerate(toks):
            m = _SID_RE.match(tok)
            if not m or m.group(1) != "abcdefghijklmnopqrstuvwxyz"[level]:
                raise PadrecError(f"{path}: item {k}: unexpected token {tok!r} at level {level}")
            codes.append(int(m.group(2)))
        out[int(k)] = codes
    if len({len(c) for c in out.values()}) != 1:
        raise PadrecError(f"{path}: semantic IDs have different lengths")
    return out


# ----------------------------------------------------------------------------------------------- per dataset


def convert_time(name: str, src: Path):
    """Beauty / Games: AtSpeed global-time split, dict files cross-checked against the 1-based text files."""
    splits = {}
    for part, stem in (("train", "training"), ("valid", "validation"), ("test", "testing")):
        d = load_npy_dict(src / f"{stem}_dict.npy")
        txt = read_sequential_txt(src / f"sequential_{part}.txt", shift=1)
        if set(d) != set(txt):
            raise PadrecError(f"{name}: users of {stem}_dict.npy and sequential_{part}.txt differ")
        for u, items in d.items():
            if [int(i) for i in items] != txt[u]:
                raise PadrecError(f"{name}: user {u}: {stem}_dict.npy and sequential_{part}.txt disagree")
        splits[part] = d
    if not (set(splits["train"]) == set(splits["valid"]) == set(splits["test"])):
        raise PadrecError(f"{name}: the three split dicts have different users")
    user_ids = sorted(splits["train"])
    if user_ids != list(range(len(user_ids))):
        raise PadrecError(f"{name}: user ids are not 0..n-1")

    titles = load_npy_dict(src / "title_maps.npy")["recid2title"]
    cats = load_npy_dict(src / "category_map.npy")["recid2category"]
    brands = load_npy_dict(src / "brand_map.npy")["recid2brand"]
    n = len(titles)
    for what, m in (("title", titles), ("category", cats), ("brand", brands)):
        check_dense(name, m, n, what)
    limit = (GAMES_MAX_CATEGORY_LEN, GAMES_MAX_CATEGORIES) if name == "games" else (None, None)
    items = []
    for i in range(n):
        title = clean_text(titles[i])
        if not title:
            raise PadrecError(f"{name}: item {i} has an empty title")
        items.append(ItemInfo(i, i, title, clean_categories(cats[i], *limit), clean_brand(brands[i])))
    users = [
        UserSplit(u, tuple(map(int, splits["train"][u])), tuple(map(int, splits["valid"][u])),
                  tuple(map(int, splits["test"][u])))
        for u in user_ids
    ]
    sids = parse_sids(src / f"{name}.LCRec-1e-3lr.json", n)
    notes = [
        "Protocol `time` (AtSpeed global-timestamp split 8:1:1): `users.jsonl.gz` holds every user of "
        "`{training,validation,testing}_dict.npy` in user-id order; `user` is the 0-based user id, item lists are the "
        "0-based item ids (already dense), chronological. The dicts were verified to equal `sequential_*.txt` "
        "(minus the +1 shift) before conversion.",
        "`items.jsonl.gz`: `id` = `raw_id` = the 0-based item id; `title` = `title_maps['recid2title']` with HTML "
        "entities decoded and whitespace collapsed (placeholder titles `title_<id>` kept as they are); `categories` = "
        "`category_map['recid2category']` (entities decoded, empty entries and duplicates dropped"
        + (f"; only entries shorter than {GAMES_MAX_CATEGORY_LEN} characters, at most {GAMES_MAX_CATEGORIES}, "
           "to drop the feature bullets" if name == "games" else "")
        + "); `brand` = `brand_map['recid2brand']`, with empty values and placeholders `brand_<id>` -> null.",
        f"`provided_sids.json.gz`: `{name}.LCRec-1e-3lr.json` with tokens `<a_47>` parsed to integer codes "
        "(`{\"<item id>\": [a, b, c, d]}`); SID collisions are kept as shipped (the tokenizer resolves them).",
    ]
    return items, users, sids, notes


def convert_loo(name: str, src: Path):
    """Toys / Yelp: P5-style sequences, leave-one-out split."""
    seqs = read_sequential_txt(src / "sequential_data.txt", shift=0)
    titles = load_npy_dict(src / "title_maps.npy")["id2title"]
    cats = load_npy_dict(src / ("category_map.npy" if name == "toys" else "category_maps.npy"))["id2category"]
    n = len(titles)
    check_dense(name, titles, n, "title")
    check_dense(name, cats, n, "category")
    titles = {int(k): v for k, v in titles.items()}
    cats = {int(k): v for k, v in cats.items()}
    items = []
    for i in range(n):
        title = clean_text(titles[i])
        if not title:
            raise PadrecError(f"{name}: item {i} has an empty title")
        c = cats[i]
        if name == "toys":  # list of category paths -> unique names in order
            c = [x for path in c for x in path]
        items.append(ItemInfo(i, i, title, clean_categories(c), None))
    users = []
    for u, seq in seqs.items():
        if len(seq) < 3:
            raise PadrecError(f"{name}: user {u} has {len(seq)} items; leave-one-out needs at least 3")
        if any(not 0 <= i < n for i in seq):
            raise PadrecError(f"{name}: user {u} has an item id outside 0..{n - 1}")
        users.append(UserSplit(u, tuple(seq[:-2]), (seq[-2],), (seq[-1],)))
    notes = [
        "Protocol `loo` (leave-one-out, as in P5/TIGER/TransRec): from `sequential_data.txt` (chronological), the last "
        "item of each user -> `test`, the second-to-last -> `valid`, the rest -> `train`. `user` is the user id of the "
        "file (an int, 1-based as shipped); users in file order.",
        "`items.jsonl.gz`: `id` = `raw_id` = the 0-based item id of the source (already dense); `title` = "
        "`title_maps['id2title']` with HTML entities decoded and whitespace collapsed; `categories` = "
        + ("the category paths of `category_map['id2category']` flattened to unique names in order (the root "
           "'Toys & Games' is kept, like the roots of the other Amazon sets)"
           if name == "toys" else "`category_maps['id2category']` (deduplicated)")
        + "; `brand` = null (not in the source).",
        "No `provided_sids.json.gz`: the source ships no semantic IDs.",
    ]
    return items, users, None, notes


def convert(name: str, src_root: Path, out_root: Path) -> dict:
    src = src_root / name
    if not (src / "SOURCE.md").is_file():
        raise PadrecError(f"{src}: not found (expected the shared dataset folder with SOURCE.md)")
    protocol = "time" if name in ("beauty", "games") else "loo"
    items, users, sids, notes = (convert_time if protocol == "time" else convert_loo)(name, src)
    dataset = Dataset(name=name, protocol=protocol, items=items, users=users)
    stats = dataset.stats()
    expected = EXPECTED[name]
    bad = {k: (stats[k], v) for k, v in expected.items() if stats[k] != v}
    if bad:
        raise PadrecError(f"{name}: counts differ from SOURCE.md (got, expected): {bad}")
    meta = {"source": f"../shared/datasets/{name} (see SOURCE.md)", "licence": LICENCE[name]}

    out_root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_root, name)
    try:
        write_dataset_dir(tmp, dataset, meta, provided_sids=sids)
        source_md = (src / "SOURCE.md").read_text(encoding="utf-8").rstrip("\n")
        section = "\n\n## Converted format\n" + (
            "Converted by `scripts/convert_shared_datasets.py` into padrec's format (see `data/README.md`). The `.npy` "
            "pickles were opcode-checked (only numpy reconstruct/ndarray/dtype and builtins.set) before loading. "
            "Files are gzip level 9 with mtime 0, so a rerun gives identical bytes.\n"
        ) + "".join(f"- {n}\n" for n in notes) + (
            f"- `meta.json` `counts` (Dataset.stats()) were checked against the counts above: users {stats['users']:,}, "
            f"items {stats['items']:,}, interactions {stats['interactions']:,} (train {stats['train_interactions']:,} / "
            f"valid {stats['valid_interactions']:,} / test {stats['test_interactions']:,}).\n"
        )
        (tmp / "SOURCE.md").write_text(source_md + section, encoding="utf-8")
        install_dir(tmp, out_root / name, overwrite=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = load_dataset(name, out_root).stats()
    if loaded != stats:
        raise PadrecError(f"{name}: reloaded stats differ: {loaded} vs {stats}")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", type=Path, default=REPO.parent / "shared" / "datasets",
                    help="folder holding beauty/ games/ toys/ yelp/ (default: ../shared/datasets)")
    ap.add_argument("--out", type=Path, default=REPO / "data", help="output data root (default: data/)")
    ap.add_argument("--only", nargs="+", choices=DATASETS, default=list(DATASETS))
    args = ap.parse_args(argv)
    try:
        for name in args.only:
            s = convert(name, args.source, args.out)
            size = sum(p.stat().st_size for p in (args.out / name).iterdir())
            print(f"{name}: users {s['users']} items {s['items']} interactions {s['interactions']} "
                  f"(train {s['train_interactions']} / valid {s['valid_interactions']} / test {s['test_interactions']}) "
                  f"-> {args.out / name} ({size / 1e6:.2f} MB)")
    except PadrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
