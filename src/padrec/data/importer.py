"""Import a user's own interaction log and item table as a padrec dataset (see data/README.md, "Importing your own data").

    import_dataset("mydata", Path("interactions.csv"), Path("items.csv"), split="loo")

Interactions: CSV with a header `user,item,timestamp` (numeric or ISO-8601 date/time) or `user,item,order` (integer
order), or JSON Lines with the same keys.  Items: CSV or JSON Lines with `id,title` and optional `categories`
(CSV: `|`-separated; JSONL: a list or a `|`-separated string), `brand`, `description`.  Files ending in `.gz` are read
through gzip.  Raw ids are kept as strings; items get dense ids in the order of the items file.

The dataset folder is written into a temporary folder under the data root and then renamed into place, so a failed
import leaves nothing behind.  `write_dataset_dir` is also used by scripts/convert_shared_datasets.py.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from padrec import PadrecError
from padrec.data.dataset import PROTOCOLS, Dataset, ItemInfo, UserSplit, data_root, load_dataset

SPLITS = PROTOCOLS  # "time" (global timestamp quantiles 8:1:1) | "loo" (leave-one-out)
MAX_HISTORY_DEFAULT = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------------- writing


def _write_gz(path: Path, text: str) -> None:
    """gzip with mtime=0, no embedded file name and level 9: identical input gives identical bytes."""
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(text.encode("utf-8"))


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def item_record(item: ItemInfo, description: str | None = None) -> dict:
    rec = {
        "id": item.id,
        "raw_id": item.raw_id,
        "title": item.title,
        "categories": list(item.categories),
        "brand": item.brand,
    }
    if description:
        rec["description"] = description
    return rec


def write_dataset_dir(
    path: Path,
    dataset: Dataset,
    meta: dict,
    provided_sids: dict[int, list[int]] | None = None,
    descriptions: dict[int, str] | None = None,
) -> dict:
    """Write meta.json, items.jsonl.gz, users.jsonl.gz (and provided_sids.json.gz) into the existing folder `path`.

    `meta` is completed with name, protocol, counts (Dataset.stats()) and max_history_default; the final meta is returned.
    """
    descriptions = descriptions or {}
    if [it.id for it in dataset.items] != list(range(dataset.num_items)):
        raise PadrecError(f"dataset {dataset.name!r}: item ids must be dense 0..n-1 in order")
    full = {"name": dataset.name, "protocol": dataset.protocol}
    full.update(meta)
    full["counts"] = dataset.stats()
    full.setdefault("max_history_default", MAX_HISTORY_DEFAULT)
    _write_gz(
        path / "items.jsonl.gz",
        "".join(_dumps(item_record(it, descriptions.get(it.id))) + "\n" for it in dataset.items),
    )
    _write_gz(
        path / "users.jsonl.gz",
        "".join(
            _dumps({"user": u.user, "train": list(u.train), "valid": list(u.valid), "test": list(u.test)}) + "\n"
            for u in dataset.users
        ),
    )
    if provided_sids is not None:
        _write_gz(
            path / "provided_sids.json.gz", _dumps({str(i): list(provided_sids[i]) for i in range(dataset.num_items)})
        )
    (path / "meta.json").write_text(json.dumps(full, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return full


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PadrecError(
            f"invalid dataset name {name!r}: use letters, digits, '_', '-', '.' (not starting with '.' or '-')"
        )


def make_temp_dir(root: Path, name: str) -> Path:
    """An empty folder under `root` (hidden name) to write a dataset into before install_dir renames it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the dataset folder should be readable like any other
    return tmp


def install_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished folder `tmp` to `target` (same file system), replacing an existing one if `overwrite`."""
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise PadrecError(f"dataset folder {target} already exists (pass overwrite=True to replace it)")
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / target.name)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(trash / target.name, target)  # put the old one back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)


# --------------------------------------------------------------------------------------------------- reading


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise PadrecError(f"{path}: unsupported file type (expected .csv or .jsonl, optionally .gz)")


def _read_rows(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line number, row dict)]) of a CSV or JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise PadrecError(f"{what} file not found: {path}")
    kind = _kind(path)
    try:
        with _open_text(path) as f:
            if kind == "csv":
                reader = csv.DictReader(f)
                columns = [c.strip() for c in (reader.fieldnames or [])]
                rows = []
                for row in reader:
                    if None in row:
                        raise PadrecError(f"{path} line {reader.line_num}: more fields than header columns")
                    clean = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
                    if all(v in (None, "") for v in clean.values()):
                        continue  # blank line
                    rows.append((reader.line_num, clean))
                return columns, rows
            rows = []
            columns: list[str] = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PadrecError(f"{path} line {lineno}: invalid JSON ({e.msg})") from e
                if not isinstance(obj, dict):
                    raise PadrecError(f"{path} line {lineno}: expected a JSON object per line")
                for k in obj:
                    if k not in columns:
                        columns.append(k)
                rows.append((lineno, obj))
            return columns, rows
    except PadrecError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise PadrecError(f"cannot read {what} file {path}: {e}") from e


def _require(path: Path, columns: list[str], rows: list[tuple[int, dict]], required: tuple[str, ...], what: str):
    missing = [c for c in required if c not in columns]
    if missing:
        raise PadrecError(
            f"{what} file {path} is missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(columns) or 'none'}; required: {', '.join(required)})"
        )
    for lineno, row in rows:
        for c in required:
            v = row.get(c)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise PadrecError(f"{what} file {path} line {lineno}: empty value in column {c!r}")


def _id_str(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        raise PadrecError(f"ids must be strings or integers, got {v!r}")
    return str(v).strip()


def _categories(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        parts = v.split("|")
    elif isinstance(v, list):
        parts = [str(x) for x in v]
    else:
        raise PadrecError(f"categories must be a list or a '|'-separated string, got {v!r}")
    return tuple(dict.fromkeys(p.strip() for p in parts if p and p.strip()))


def _read_items(path: Path) -> tuple[list[ItemInfo], dict[int, str]]:
    columns, rows = _read_rows(path, "items")
    missing = [c for c in ("id", "title") if c not in columns]
    if missing:
        raise PadrecError(
            f"items file {path} is missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(columns) or 'none'}; required: id, title)"
        )
    items: list[ItemInfo] = []
    descriptions: dict[int, str] = {}
    seen: dict[str, int] = {}
    for lineno, row in rows:
        try:
            raw = _id_str(row.get("id"))
        except PadrecError as e:
            raise PadrecError(f"items file {path} line {lineno}: {e}") from None
        if not raw:
            raise PadrecError(f"items file {path} line {lineno}: empty item id")
        if raw in seen:
            raise PadrecError(f"items file {path} line {lineno}: duplicate item id {raw!r} (first on line {seen[raw]})")
        seen[raw] = lineno
        title = row.get("title")
        title = title.strip() if isinstance(title, str) else ("" if title is None else str(title).strip())
        if not title:
            raise PadrecError(f"items file {path} line {lineno}: item {raw!r} has an empty title")
        try:
            cats = _categories(row.get("categories"))
        except PadrecError as e:
            raise PadrecError(f"items file {path} line {lineno}: {e}") from None
        brand = row.get("brand")
        brand = str(brand).strip() if brand not in (None, "") else None
        dense = len(items)
        items.append(ItemInfo(dense, raw, title, cats, brand or None))
        desc = row.get("description")
        if desc not in (None, "") and str(desc).strip():
            descriptions[dense] = str(desc).strip()
    if not items:
        raise PadrecError(f"items file {path} has no items")
    return items, descriptions


def _parse_time(v) -> float:
    if isinstance(v, bool):
        raise ValueError("boolean")
    if isinstance(v, (int, float)):
        x = float(v)
    else:
        s = str(v).strip()
        try:
            x = float(s)
        except ValueError:
            if s.endswith(("Z", "z")):
                s = s[:-1] + "+00:00"
            dt = datetime.fromisoformat(s)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            x = dt.timestamp()
    if not math.isfinite(x):
        raise ValueError("not finite")
    return x


def _parse_order(v) -> int:
    if isinstance(v, bool):
        raise ValueError("boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise ValueError("not an integer")
    return int(str(v).strip())


def _read_interactions(path: Path, item_index: dict[str, int]):
    """[(user, dense item, time key, line)] and the name of the time column."""
    columns, rows = _read_rows(path, "interactions")
    if "timestamp" in columns:
        tcol = "timestamp"
    elif "order" in columns:
        tcol = "order"
    else:
        missing = [c for c in ("user", "item") if c not in columns] + ["timestamp (or order)"]
        raise PadrecError(
            f"interactions file {path} is missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(columns) or 'none'}; required: user,item,timestamp or user,item,order)"
        )
    _require(path, columns, rows, ("user", "item", tcol), "interactions")
    out = []
    for lineno, row in rows:
        try:
            user = _id_str(row["user"])
            raw_item = _id_str(row["item"])
        except PadrecError as e:
            raise PadrecError(f"interactions file {path} line {lineno}: {e}") from None
        item = item_index.get(raw_item)
        if item is None:
            raise PadrecError(
                f"interactions file {path} line {lineno}: unknown item id {raw_item!r} (not in the items file)"
            )
        try:
            t = _parse_time(row[tcol]) if tcol == "timestamp" else _parse_order(row[tcol])
        except (ValueError, TypeError, OverflowError):
            expected = "a number or an ISO-8601 date" if tcol == "timestamp" else "an integer"
            raise PadrecError(
                f"interactions file {path} line {lineno}: bad {tcol} {row[tcol]!r} (expected {expected})"
            ) from None
        out.append((user, item, t, lineno))
    if not out:
        raise PadrecError(f"interactions file {path} has no interactions")
    return out, tcol


def _time_cuts(times: list[float]) -> tuple[float, float]:
    """Global 80% and 90% timestamp quantiles: train < q80 <= valid < q90 <= test."""
    s = sorted(times)
    n = len(s)
    return s[min(n - 1, int(0.8 * n))], s[min(n - 1, int(0.9 * n))]


def split_users(interactions, split: str) -> list[UserSplit]:
    """Group (user, item, time, line) rows per user (first-appearance order), sort stably by time, then split."""
    per_user: dict[str, list[tuple[float, int]]] = {}
    for user, item, t, _ in interactions:
        per_user.setdefault(user, []).append((t, item))
    users = []
    if split == "time":
        q80, q90 = _time_cuts([t for _, _, t, _ in interactions])
        for user, seq in per_user.items():
            seq = sorted(seq, key=lambda x: x[0])
            train = tuple(i for t, i in seq if t < q80)
            valid = tuple(i for t, i in seq if q80 <= t < q90)
            test = tuple(i for t, i in seq if t >= q90)
            users.append(UserSplit(user, train, valid, test))
    else:  # loo
        for user, seq in per_user.items():
            items = [i for _, i in sorted(seq, key=lambda x: x[0])]
            if len(items) >= 3:
                users.append(UserSplit(user, tuple(items[:-2]), (items[-2],), (items[-1],)))
            else:
                users.append(UserSplit(user, tuple(items), (), ()))
    return users


# --------------------------------------------------------------------------------------------------- entry point


def import_dataset(
    name: str,
    interactions: Path,
    items: Path,
    split: str = "loo",
    root: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate and convert the two files into `<root>/<name>/`; returns that folder. Raises PadrecError on bad input."""
    check_name(name)
    if split not in SPLITS:
        raise PadrecError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root) if root is not None else data_root()
    interactions, items = Path(interactions), Path(items)
    target = root / name
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise PadrecError(f"dataset {name!r} already exists in {root} (pass overwrite=True to replace it)")
    for p, what in ((interactions, "interactions"), (items, "items")):
        if not p.is_file():
            raise PadrecError(f"{what} file not found: {p}")

    item_list, descriptions = _read_items(items)
    rows, tcol = _read_interactions(interactions, {it.raw_id: it.id for it in item_list})
    if split == "time" and tcol != "timestamp":
        raise PadrecError("split 'time' needs a timestamp column (the interactions file has 'order'); use split='loo'")
    users = split_users(rows, split)
    dataset = Dataset(name=name, protocol=split, items=item_list, users=users)
    meta = {
        "source": f"imported from {interactions.name} and {items.name} with padrec.data.importer",
        "licence": "as provided by the user (unknown to padrec)",
        "split": {
            "time": "global timestamp quantiles 8:1:1 (train < q80 <= valid < q90 <= test)",
            "loo": "leave-one-out: last -> test, second-to-last -> valid; users with < 3 interactions: all train",
        }[split],
    }

    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, name)
    try:
        write_dataset_dir(tmp, dataset, meta, descriptions=descriptions)
        install_dir(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    load_dataset(name, root)  # sanity: the result must load
    return target
