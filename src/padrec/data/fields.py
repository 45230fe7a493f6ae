"""Which column of a user's file holds what, and how one value is read (ids, times, orders, categories).

Column names are found case-insensitively among common spellings (RecBole's `user_id` / `item_id`, Amazon's
`reviewerID` / `asin`, Yelp's `business_id`, ...) unless the user names them (`ColumnMap`); the importer's report
says which column was used for each field and which columns were ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from datetime import datetime, timezone

from padrec import PadrecError

INTERACTION_FIELDS = {
    "user": ("user", "user_id", "userid", "uid", "reviewerid", "customer_id", "visitor_id"),
    "item": ("item", "item_id", "itemid", "iid", "asin", "business_id", "product_id", "movie_id", "parent_asin"),
    "time": ("timestamp", "time", "ts", "unixreviewtime", "datetime", "date", "event_time"),
    "order": ("order", "position", "seq"),
}
ITEM_FIELDS = {
    "item_id": ("id", "item_id", "item", "itemid", "iid", "asin", "business_id", "product_id", "movie_id",
                "parent_asin"),
    "title": ("title", "name", "item_name", "movie_title", "product_name"),
    "categories": ("categories", "category", "genres", "genre", "class", "main_category"),
    "brand": ("brand", "store", "manufacturer"),
    "description": ("description", "desc", "summary"),
}
_NUMBER_ID = re.compile(r"^[+-]?\d+(\.0*)?$")


@dataclass(frozen=True)
class ColumnMap:
    """The user's names for the fields; None: found among the usual spellings (INTERACTION_FIELDS, ITEM_FIELDS)."""

    user: str | None = None
    item: str | None = None
    time: str | None = None  # a number (Unix seconds) or an ISO-8601 date / date-time
    order: str | None = None  # an integer order, where there is no time
    item_id: str | None = None  # the items file's id column
    title: str | None = None
    categories: str | None = None
    brand: str | None = None
    description: str | None = None

    def given(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def resolve_columns(columns: list[str], wanted: dict[str, tuple[str, ...]], given: dict[str, str],
                    what: str, path) -> dict[str, str | None]:
    """field -> the column that holds it (None if absent): the user's name if given, else the first usual spelling."""
    lower = {c.lower(): c for c in reversed(columns)}  # first spelling wins among case variants
    out: dict[str, str | None] = {}
    for name, spellings in wanted.items():
        if name in given:
            if given[name] not in columns:
                raise PadrecError(
                    f"{what} file {path} has no column {given[name]!r} (given for {name}; found: "
                    f"{', '.join(columns) or 'none'})")
            out[name] = given[name]
        else:
            out[name] = next((lower[s] for s in spellings if s in lower), None)
    return out


def id_string(v) -> str:
    """An id as a string: JSON numbers and text compare alike (5, 5.0 and "5" are the same id)."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"ids must be strings or integers, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"ids must be strings or integers, got {v!r}")
        return str(int(v))
    if isinstance(v, (int, str)):
        return str(v).strip()
    raise ValueError(f"ids must be strings or integers, got {v!r}")


def numeric_id(raw: str) -> str | None:
    """The canonical form of an id written as a number ("5.0", "+5", "5" -> "5"); None for other ids. Leading
    zeros are kept apart ("007" is not "7"): they are usually part of a code."""
    if not _NUMBER_ID.match(raw):
        return None
    digits = raw.split(".")[0].lstrip("+")
    body = digits.lstrip("-")
    return None if len(body) > 1 and body.startswith("0") else digits


def categories(v, sep: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        parts = v.split(sep) if sep else [v]
    elif isinstance(v, list):
        parts = [str(x) for x in v]
    else:
        raise ValueError(f"categories must be a list or a {sep!r}-separated string, got {v!r}")
    return tuple(dict.fromkeys(p.strip() for p in parts if p and p.strip()))


def text_or_none(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, list):
        v = " ".join(str(x) for x in v)
    s = str(v).strip()
    return s or None


def parse_time(v) -> float:
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


def parse_order(v) -> int:
    if isinstance(v, bool):
        raise ValueError("boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise ValueError("not an integer")
    return int(str(v).strip())
