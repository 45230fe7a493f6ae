"""Import a user's own interaction log and item table as a padrec dataset (data/README.md, "Importing your own data").

    import_dataset("mydata", Path("interactions.csv"), Path("items.csv"), split="loo")
    path, report = import_with_report("ml", Path("ml-100k.inter"), Path("ml-100k.item"), options=ImportOptions(...))

Files: CSV, TSV, JSON Lines or RecBole atomic files (`padrec.data.tables`); columns found by their usual names or
named by the user (`padrec.data.fields.ColumnMap`). Real data has defects; `ImportOptions` says what happens to each
(keep, drop or refuse), and every row read is accounted for in the `ImportReport`, which is stored beside the dataset
as `import_report.json`. Raw ids are kept as strings; items get dense ids in the order of the items file (items that
only the interactions name come after, with `unknown_items="add"`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from padrec import PadrecError
from padrec.data import fields as F
from padrec.data.dataset import PROTOCOLS, Dataset, ItemInfo, UserSplit, data_root, load_dataset
from padrec.data.import_report import ImportReport
from padrec.data.tables import Table, read_table
from padrec.data.writer import check_name, install_dir, make_temp_dir, write_dataset_dir

SPLITS = PROTOCOLS  # "time" (global timestamp quantiles 8:1:1) | "loo" (leave-one-out)
REPORT_FILE = "import_report.json"
POLICIES = {
    "unknown_items": ("drop", "add", "error"),
    "duplicate_items": ("first", "error"),
    "duplicate_interactions": ("drop", "keep"),
    "bad_rows": ("drop", "error"),
    "encoding_errors": ("replace", "strict"),
}


@dataclass(frozen=True)
class ImportOptions:
    columns: F.ColumnMap = field(default_factory=F.ColumnMap)
    # an interaction whose item is not in the items file: drop it, add the item (no text), or refuse the import
    unknown_items: str = "drop"
    # two item rows with one id and different fields: keep the first, or refuse (identical rows are always merged)
    duplicate_items: str = "first"
    # rows repeating an earlier (user, item, time): drop them (an export artefact), or keep them
    duplicate_interactions: str = "drop"
    # a row with an empty id or time, or a time that does not parse: drop it, or refuse the import
    bad_rows: str = "drop"
    # users with fewer interactions (after the drops above) are dropped with them; 1 keeps everyone
    min_user_interactions: int = 1
    encoding: str = "utf-8"
    encoding_errors: str = "replace"  # bytes invalid in `encoding`: replace them (U+FFFD), or refuse
    categories_sep: str = "|"  # in CSV / TSV text; JSON lists and RecBole token_seq fields are lists already
    delimiter: str | None = None  # of CSV / TSV files; None: ',' for .csv, tab for .tsv and RecBole
    interactions_format: str | None = None  # csv | tsv | jsonl | recbole; None: from the file's suffix
    items_format: str | None = None

    def __post_init__(self):
        for name, allowed in POLICIES.items():
            if getattr(self, name) not in allowed:
                raise PadrecError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.min_user_interactions < 1:
            raise PadrecError(f"min_user_interactions must be >= 1, got {self.min_user_interactions}")


@dataclass
class _Catalogue:
    items: list[ItemInfo] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # raw id -> dense id
    by_number: dict[str, int] = field(default_factory=dict)  # numeric canonical form -> dense id (unambiguous only)

    def add(self, item: ItemInfo) -> None:
        self.index[item.raw_id] = item.id
        self.items.append(item)
        num = F.numeric_id(item.raw_id)
        if num is not None:
            self.by_number[num] = -1 if num in self.by_number else item.id

    def find(self, raw: str) -> tuple[int | None, bool]:
        """(dense id or None, whether it matched only as a number)."""
        if raw in self.index:
            return self.index[raw], False
        num = F.numeric_id(raw)
        dense = self.by_number.get(num, -1) if num is not None else -1
        return (dense, True) if dense >= 0 else (None, False)


def _table(path: Path, what: str, fmt: str | None, opts: ImportOptions, report: ImportReport) -> Table:
    table = read_table(path, what, fmt, opts.encoding, opts.encoding_errors, opts.delimiter)
    if table.repaired_lines:
        shown = ", ".join(map(str, table.repaired_lines[:5]))
        report.notes.append(
            f"{what} file: {len(table.repaired_lines)} line(s) held bytes that are not valid {opts.encoding} "
            f"(lines {shown}{', ...' if len(table.repaired_lines) > 5 else ''}); they were kept with U+FFFD in "
            "their place: pass --encoding (e.g. cp1252) if the file is in another encoding")
    return table


def _bad(opts: ImportOptions, tally, path: Path, lineno: int, problem: str) -> None:
    """A row that cannot be read: refused, or dropped under the problem's first words (its kind)."""
    if opts.bad_rows == "error":
        raise PadrecError(f"{path} line {lineno}: {problem}; pass --bad-rows drop to skip such rows (reported)")
    tally.drop(problem.split(" (")[0], f"line {lineno}")


def _file_info(table: Table, used: dict[str, str | None]) -> dict:
    taken = {c for c in used.values() if c}
    return {"path": str(table.path), "format": table.format, "encoding": table.encoding,
            "columns_used": {k: v for k, v in used.items() if v}, "ignored_columns": [c for c in table.columns
                                                                                     if c not in taken],
            "blank_lines": table.blank_lines}


# --------------------------------------------------------------------------------------------------- items


def _item_fields(row: dict, cols: dict, opts: ImportOptions) -> tuple[str, tuple[str, ...], str | None, str | None]:
    """(title, categories, brand, description) of one items row; ValueError for a malformed categories value."""
    get = lambda name: row.get(cols[name]) if cols[name] else None  # noqa: E731
    return (F.text_or_none(get("title")) or "", F.categories(get("categories"), opts.categories_sep),
            F.text_or_none(get("brand")), F.text_or_none(get("description")))


def _read_items(path: Path, opts: ImportOptions, report: ImportReport) -> _Catalogue:
    table = _table(path, "items", opts.items_format, opts, report)
    cols = F.resolve_columns(table.columns, F.ITEM_FIELDS, opts.columns.given(), "items", path)
    if cols["item_id"] is None:
        raise PadrecError(
            f"items file {path} has no id column (found: {', '.join(table.columns) or 'none'}; looked for "
            f"{', '.join(F.ITEM_FIELDS['item_id'])}): name it with --item-id-col")
    report.files["items"] = _file_info(table, cols)
    cat, tally, first = _Catalogue(), report.items, {}
    for lineno, row in table.rows:
        tally.read += 1
        try:
            raw = F.id_string(row.get(cols["item_id"]))
            title, cats, brand, desc = _item_fields(row, cols, opts)
        except ValueError as e:
            _bad(opts, tally, path, lineno, f"unreadable value ({e})")
            continue
        if not raw:
            _bad(opts, tally, path, lineno, "empty item id")
            continue
        if raw in first:
            _duplicate_item(first[raw], (title, cats, brand, desc), raw, lineno, path, opts, tally)
            continue
        first[raw] = (lineno, (title, cats, brand, desc))
        item = ItemInfo(len(cat.items), raw, title, cats, brand, desc)
        if not title:
            has_text = desc or cats or brand
            tally.change("no title: described by its description, categories or brand" if has_text else
                         "no title and no other text: described by its id", f"line {lineno}: item {raw!r}")
        cat.add(item)
    return cat


def _duplicate_item(first, fields_, raw, lineno, path, opts, tally) -> None:
    first_line, first_fields = first
    if fields_ == first_fields:
        tally.drop("repeats an earlier row of the same item", f"line {lineno}: item {raw!r}")
        return
    if opts.duplicate_items == "error":
        raise PadrecError(
            f"items file {path} line {lineno}: item {raw!r} again (first on line {first_line}) with other fields; "
            "pass --duplicate-items first to keep each item's first row (reported)")
    tally.drop("same id as an earlier row, other fields: the first row is kept",
               f"line {lineno}: item {raw!r} (first on line {first_line})")


# --------------------------------------------------------------------------------------------------- interactions


def _interaction_columns(table: Table, opts: ImportOptions) -> tuple[dict, str]:
    """The resolved columns and the name of the ordering field ("time" or "order")."""
    given = opts.columns.given()
    cols = F.resolve_columns(table.columns, F.INTERACTION_FIELDS, given, "interactions", table.path)
    key = "order" if "order" in given and "time" not in given else ("time" if cols["time"] else "order")
    missing = [f"{name} (--{name}-col)" for name in ("user", "item") if cols[name] is None]
    if cols[key] is None:
        missing.append("timestamp or order (--time-col / --order-col)")
    if missing:
        raise PadrecError(
            f"interactions file {table.path} is missing column(s) {', '.join(missing)} (found: "
            f"{', '.join(table.columns) or 'none'}); name the columns with the options shown")
    cols["order" if key == "time" else "time"] = None  # the other one is not used
    return cols, key


def _item_of(raw: str, cat: _Catalogue, opts: ImportOptions, report: ImportReport, path: Path,
             lineno: int) -> int | None:
    dense, by_number = cat.find(raw)
    if by_number:
        report.interactions.change("item id matched an items-file id as a number",
                                   f"line {lineno}: {raw!r} -> {cat.items[dense].raw_id!r}")
    if dense is not None:
        return dense
    if opts.unknown_items == "error":
        raise PadrecError(f"interactions file {path} line {lineno}: unknown item id {raw!r} (not in the items "
                          "file); pass --unknown-items drop to skip such rows or --unknown-items add to import them")
    if opts.unknown_items == "drop":
        report.interactions.drop("item not in the items file", f"line {lineno}: item {raw!r}")
        return None
    report.items.add("named only by the interactions (no text: described by its id)", f"item {raw!r}")
    cat.add(ItemInfo(len(cat.items), raw, ""))
    return len(cat.items) - 1


def _parse_row(row: dict, cols: dict, key: str) -> tuple[str, str, float]:
    """(user, raw item, time key); ValueError naming what is wrong."""
    values = {name: row.get(cols[name]) for name in ("user", "item", key)}
    for name, v in values.items():
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"empty {name}")
    try:
        t = F.parse_time(values[key]) if key == "time" else F.parse_order(values[key])
    except (ValueError, TypeError, OverflowError):
        expected = "a number or an ISO-8601 date" if key == "time" else "an integer"
        raise ValueError(f"unreadable {key} (expected {expected})") from None
    return F.id_string(values["user"]), F.id_string(values["item"]), t


def _read_interactions(path: Path, cat: _Catalogue, opts: ImportOptions, report: ImportReport):
    """[(user, dense item, time key, line)] and the ordering field ("time" or "order")."""
    table = _table(path, "interactions", opts.interactions_format, opts, report)
    cols, key = _interaction_columns(table, opts)
    report.files["interactions"] = _file_info(table, cols)
    out, seen, users_seen, tally = [], set(), {}, report.interactions  # users in order of first appearance
    for lineno, row in table.rows:
        tally.read += 1
        try:
            user, raw_item, t = _parse_row(row, cols, key)
        except ValueError as e:
            _bad(opts, tally, path, lineno, str(e))
            continue
        report.users.read += user not in users_seen
        users_seen.setdefault(user)
        item = _item_of(raw_item, cat, opts, report, path, lineno)
        if item is None:
            continue
        if opts.duplicate_interactions == "drop":
            if (user, item, t) in seen:
                tally.drop("repeats an earlier row (same user, item and time)", f"line {lineno}")
                continue
            seen.add((user, item, t))
        out.append((user, item, t, lineno))
    kept_users = {row[0] for row in out}
    for user in users_seen:
        if user not in kept_users:
            report.users.drop("every interaction of the user was dropped", f"user {user!r}")
    return out, key


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



def _min_interactions(rows, opts: ImportOptions, report: ImportReport):
    """Drop the users with fewer than opts.min_user_interactions rows, and their rows."""
    counts: dict[str, int] = {}
    for user, *_ in rows:
        counts[user] = counts.get(user, 0) + 1
    n = opts.min_user_interactions
    if n <= 1:
        return rows
    few = {u for u, c in counts.items() if c < n}
    for u in counts:  # first-appearance order: the report is the same whatever PYTHONHASHSEED
        if u in few:
            report.users.drop(f"fewer than {n} interactions (--min-user-interactions)", f"user {u!r}")
    kept = []
    for row in rows:
        if row[0] in few:
            report.interactions.drop(f"its user has fewer than {n} interactions", f"line {row[3]}")
        else:
            kept.append(row)
    return kept


def _user_notes(users: list[UserSplit], split: str, report: ImportReport) -> None:
    single = sum(1 for u in users if len(u.train) + len(u.valid) + len(u.test) == 1)
    if single:
        report.notes.append(f"{single} user(s) have a single interaction: kept, in train only (no query)")
    no_query = sum(1 for u in users if not (u.valid or u.test) or not u.train)
    if no_query:
        rule = ("fewer than 3 interactions" if split == "loo"
                else "no training item, or none in the validation / test periods")
        report.notes.append(f"{no_query} user(s) yield no validation or test query ({rule}); they still train")


def _no_rows_error(path: Path, report: ImportReport) -> PadrecError:
    t = report.interactions
    why = "; ".join(f"{n} {reason} (e.g. {', '.join(t.examples.get(reason, [])[:3])})"
                    for reason, n in t.dropped.items())
    return PadrecError(f"interactions file {path}: no interactions left to import"
                       + (f" ({t.read} read, all dropped: {why})" if t.read else " (the file has no rows)"))


# --------------------------------------------------------------------------------------------------- entry point


def _read_dataset(name, interactions: Path, items: Path | None, split: str, opts: ImportOptions,
                  report: ImportReport) -> Dataset:
    if items is not None:
        cat = _read_items(items, opts, report)
    else:
        cat = _Catalogue()
        opts = replace(opts, unknown_items="add")
        report.notes.append("no items file: every item comes from the interactions and has no text, so semantic "
                            "IDs cannot group similar items (pass an items file with titles for that)")
    rows, key = _read_interactions(interactions, cat, opts, report)
    if split == "time" and key != "time":
        raise PadrecError("split 'time' needs a timestamp column (the interactions file has only an order); "
                          "use split 'loo', or name the time column with --time-col")
    rows = _min_interactions(rows, opts, report)
    if not rows:
        raise _no_rows_error(interactions, report)
    if not cat.items:
        raise PadrecError(f"items file {items} has no items")
    users = split_users(rows, split)
    _user_notes(users, split, report)
    return Dataset(name=name, protocol=split, items=cat.items, users=users)


def import_with_report(name: str, interactions: Path, items: Path | None, split: str = "loo",
                       root: Path | None = None, overwrite: bool = False,
                       options: ImportOptions | None = None) -> tuple[Path, ImportReport]:
    """Validate and convert the files into `<root>/<name>/`; returns that folder and the import report (also saved
    there as import_report.json). Raises PadrecError on input it refuses, before anything is written."""
    check_name(name)
    if split not in SPLITS:
        raise PadrecError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    opts = options or ImportOptions()
    root = Path(root) if root is not None else data_root()
    target = root / name
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise PadrecError(f"dataset {name!r} already exists in {root} (pass --overwrite to replace it)")
    report = ImportReport(name, options={**asdict(opts), "split": split})
    interactions = Path(interactions)
    dataset = _read_dataset(name, interactions, Path(items) if items is not None else None, split, opts, report)
    meta = {
        "source": f"imported from {interactions.name}" + (f" and {Path(items).name}" if items else "")
                  + " with padrec.data.importer",
        "licence": "as provided by the user (unknown to padrec)",
        "split": {
            "time": "global timestamp quantiles 8:1:1 (train < q80 <= valid < q90 <= test)",
            "loo": "leave-one-out: last -> test, second-to-last -> valid; users with < 3 interactions: all train",
        }[split],
        "import_report": REPORT_FILE,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, name)
    try:
        text = json.dumps(report.to_dict(), ensure_ascii=False, indent=1) + "\n"
        write_dataset_dir(tmp, dataset, meta, extra_files={REPORT_FILE: text})
        install_dir(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    load_dataset(name, root)  # sanity: the result must load
    return target, report


def import_dataset(name: str, interactions: Path, items: Path | None, split: str = "loo", root: Path | None = None,
                   overwrite: bool = False, options: ImportOptions | None = None) -> Path:
    """`import_with_report` without the report (it is in the folder's import_report.json)."""
    return import_with_report(name, interactions, items, split, root, overwrite, options)[0]
