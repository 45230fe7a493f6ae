"""The in-memory dataset: items with text, and each user's chronological train/valid/test items.

On disk a dataset is a folder `<data_root>/<name>/` holding (see data/README.md):
  meta.json          name, protocol ("time" | "loo"), counts, provenance
  items.jsonl.gz     one item per line: {"id": dense int, "raw_id": id as in the source, "title", "categories", "brand"}
  users.jsonl.gz     one user per line: {"user": id as in the source, "train": [...], "valid": [...], "test": [...]}
                     (item lists hold dense ids, chronological)
  provided_sids.json.gz   optional: {"<dense id>": [code, ...]} semantic IDs shipped with the source
Nothing here unpickles anything.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from padrec import PadrecError

PROTOCOLS = ("time", "loo")
DESCRIPTION_CHARS = 300  # of a description that stands in for a missing title: a few sentences, about a title's worth


def data_root() -> Path:
    """Where datasets live: $PADREC_DATA_DIR, else the repository's data/ folder."""
    env = os.environ.get("PADREC_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "data"


def list_datasets(root: Path | None = None) -> list[str]:
    root = root or data_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())


@dataclass(frozen=True)
class ItemInfo:
    id: int
    raw_id: str | int
    title: str
    categories: tuple[str, ...] = ()
    brand: str | None = None
    description: str | None = None  # imported datasets only; embedded only for an item without a title

    def text(self) -> str:
        """The text that is embedded to build semantic IDs: the title, categories and brand. An item without a title
        (real catalogues have some) is described by the start of its description instead, and one with no text at
        all by its id, so that it still gets a semantic ID."""
        parts = [self.title] if self.title else []
        if not self.title and self.description:
            parts.append(self.description[:DESCRIPTION_CHARS])
        if self.categories:
            parts.append("Categories: " + ", ".join(self.categories))
        if self.brand:
            parts.append("Brand: " + self.brand)
        return ". ".join(parts) or f"Item {self.raw_id}"


@dataclass(frozen=True)
class UserSplit:
    user: str | int
    train: tuple[int, ...]
    valid: tuple[int, ...]
    test: tuple[int, ...]


@dataclass(frozen=True)
class EvalCase:
    """One evaluation query: a history (dense item ids, oldest first) and the set of target items."""

    user: str | int
    history: tuple[int, ...]
    targets: tuple[int, ...]


@dataclass
class Dataset:
    name: str
    protocol: str
    items: list[ItemInfo]
    users: list[UserSplit]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_items(self) -> int:
        return len(self.items)

    def train_sequences(self) -> list[tuple[int, ...]]:
        """Each user's training items (chronological); users with no training item are skipped."""
        return [u.train for u in self.users if u.train]

    def eval_cases(self, split: str, max_history: int | None = None) -> list[EvalCase]:
        """Queries of the split under the dataset's protocol.

        valid: history = train, targets = valid items.  test: history = train + valid, targets = test items.
        For the time protocol targets are a *set* (all of the user's items in that period); for
        leave-one-out a single item. Users with no target or an empty history are skipped.
        """
        if split not in ("valid", "test"):
            raise PadrecError(f"unknown split {split!r}: expected 'valid' or 'test'")
        cases = []
        for u in self.users:
            history = u.train if split == "valid" else u.train + u.valid
            targets = u.valid if split == "valid" else u.test
            if not targets or not history:
                continue
            if max_history is not None:
                history = history[-max_history:]
            cases.append(EvalCase(u.user, history, tuple(dict.fromkeys(targets))))
        return cases

    def stats(self) -> dict:
        n_train = sum(len(u.train) for u in self.users)
        n_valid = sum(len(u.valid) for u in self.users)
        n_test = sum(len(u.test) for u in self.users)
        return {
            "dataset": self.name,
            "protocol": self.protocol,
            "users": len(self.users),
            "items": self.num_items,
            "interactions": n_train + n_valid + n_test,
            "train_interactions": n_train,
            "valid_interactions": n_valid,
            "test_interactions": n_test,
            "users_with_valid": sum(1 for u in self.users if u.valid),
            "users_with_test": sum(1 for u in self.users if u.test),
        }


def _read_jsonl_gz(path: Path) -> list[dict]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise PadrecError(f"dataset file {path} is unreadable or corrupt: {e}") from e


def load_dataset(name: str, root: Path | None = None) -> Dataset:
    root = root or data_root()
    path = root / name
    if not (path / "meta.json").is_file():
        known = ", ".join(list_datasets(root)) or "none"
        raise PadrecError(f"unknown dataset {name!r} (known in {root}: {known})")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("protocol") not in PROTOCOLS:
        raise PadrecError(f"dataset {name!r}: meta.json protocol must be one of {PROTOCOLS}")
    items = [
        ItemInfo(r["id"], r["raw_id"], r["title"], tuple(r.get("categories") or ()), r.get("brand"),
                 r.get("description"))
        for r in _read_jsonl_gz(path / "items.jsonl.gz")
    ]
    if [it.id for it in items] != list(range(len(items))):
        raise PadrecError(f"dataset {name!r}: item ids must be dense 0..n-1 in file order")
    users = [
        UserSplit(r["user"], tuple(r["train"]), tuple(r["valid"]), tuple(r["test"]))
        for r in _read_jsonl_gz(path / "users.jsonl.gz")
    ]
    return Dataset(name=name, protocol=meta["protocol"], items=items, users=users, meta=meta, path=path)


def load_provided_sids(dataset: Dataset) -> list[list[int]] | None:
    """Semantic IDs shipped with the source (Beauty, Games), as one code list per dense item id."""
    if dataset.path is None or not (dataset.path / "provided_sids.json.gz").is_file():
        return None
    with gzip.open(dataset.path / "provided_sids.json.gz", "rt") as f:
        raw = json.load(f)
    return [raw[str(i)] for i in range(dataset.num_items)]
