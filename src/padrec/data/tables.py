"""Read a user's tabular file into rows: CSV, TSV, JSON Lines, or RecBole atomic files (`.inter`, `.item`).

Every reader gives the same `Table`: the column names, `(line number, {column: value})` rows, and what decoding
had to repair. RecBole atomic files are tab-separated with a `name:type` header (`user_id:token`,
`timestamp:float`, `categories:token_seq`); the type suffix is dropped from the column name and `token_seq` values
become lists (split on spaces, RecBole's default `seq_separator`). Files ending in `.gz` are read through gzip.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from padrec import PadrecError

FORMATS = ("csv", "tsv", "jsonl", "recbole")
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_SUFFIX_FORMAT = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                  ".ndjson": "jsonl", ".inter": "recbole", ".item": "recbole", ".user": "recbole"}


@dataclass
class Table:
    path: Path
    format: str
    columns: list[str]
    rows: list[tuple[int, dict]]
    encoding: str
    repaired_lines: list[int] = field(default_factory=list)  # lines whose bytes did not decode (replaced by U+FFFD)
    blank_lines: int = 0


def file_format(path: Path, given: str | None = None) -> str:
    if given is not None:
        if given not in FORMATS:
            raise PadrecError(f"unknown file format {given!r}: expected one of {', '.join(FORMATS)}")
        return given
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = name[name.rfind("."):] if "." in name else ""
    if suffix not in _SUFFIX_FORMAT:
        raise PadrecError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}: expected .csv, .tsv, .jsonl, or RecBole's "
            ".inter / .item (optionally .gz); or name the format with --format")
    return _SUFFIX_FORMAT[suffix]


def _decode(path: Path, data: bytes, encoding: str, errors: str) -> tuple[str, list[int]]:
    """The file's text, and the 1-based lines that held bytes invalid in `encoding` (replaced, if errors='replace')."""
    enc = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return data.decode(enc), []
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        if errors == "strict":
            raise PadrecError(
                f"{path} line {line}: bytes that are not valid {encoding} ({e.reason} at byte {e.start}); if the file "
                f"is in another encoding pass --encoding (e.g. cp1252 or latin-1), or --encoding-errors replace to "
                "keep those rows with U+FFFD in place of the bad bytes") from None
    lines = data.split(b"\n")
    bad = []
    for i, raw in enumerate(lines, 1):
        try:
            raw.decode(enc if i == 1 else encoding)
        except UnicodeDecodeError:
            bad.append(i)
    return data.decode(enc, errors="replace"), bad


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise PadrecError(f"{what} file not found: {path}")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise PadrecError(f"cannot read {what} file {path}: {e}") from e


def _delimited(path: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, dict]], int]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows, blank = [], 0
        for row in reader:
            if None in row:
                raise PadrecError(f"{path} line {reader.line_num}: more fields than header columns ({len(columns)})")
            clean = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            if all(v in (None, "") for v in clean.values()):
                blank += 1
                continue
            rows.append((reader.line_num, clean))
    except csv.Error as e:
        raise PadrecError(f"{path} line {reader.line_num}: not readable as delimited text ({e})") from e
    return columns, rows, blank


def _jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict]], int]:
    columns: dict[str, None] = {}
    rows, blank = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            blank += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PadrecError(f"{path} line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise PadrecError(f"{path} line {lineno}: expected a JSON object per line")
        columns.update(dict.fromkeys(obj))
        rows.append((lineno, obj))
    return list(columns), rows, blank


def _recbole(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict]], int]:
    """Tab-separated, header `name:type`; token_seq / float_seq values become lists."""
    columns, rows, blank = _delimited(path, text, "\t")
    names, seqs = [], set()
    for c in columns:
        name, sep, kind = c.rpartition(":")
        if not sep or kind not in RECBOLE_TYPES:
            raise PadrecError(
                f"{path}: RecBole header field {c!r} is not 'name:type' with a type in {', '.join(RECBOLE_TYPES)} "
                "(a plain tab-separated file should end in .tsv)")
        names.append(name)
        if kind.endswith("_seq"):
            seqs.add(name)
    renamed = []
    for lineno, row in rows:
        out = {}
        for c, name in zip(columns, names):
            v = row.get(c)
            out[name] = v.split() if name in seqs and isinstance(v, str) else v
        renamed.append((lineno, out))
    return names, renamed, blank


def read_table(path: Path, what: str, fmt: str | None = None, encoding: str = "utf-8",
               encoding_errors: str = "replace", delimiter: str | None = None) -> Table:
    """Read `path` (an interactions or items file, named `what` in messages) into a Table."""
    path = Path(path)
    if encoding_errors not in ("replace", "strict"):
        raise PadrecError(f"encoding_errors must be 'replace' or 'strict', got {encoding_errors!r}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise PadrecError(f"unknown text encoding {encoding!r} (e.g. utf-8, cp1252, latin-1)") from None
    kind = file_format(path, fmt)
    text, repaired = _decode(path, _read_bytes(path, what), encoding, encoding_errors)
    if kind == "jsonl":
        columns, rows, blank = _jsonl(path, text)
    elif kind == "recbole":
        columns, rows, blank = _recbole(path, text)
    else:
        columns, rows, blank = _delimited(path, text, delimiter or ("\t" if kind == "tsv" else ","))
    return Table(path, kind, columns, rows, encoding, repaired, blank)
