"""The item <-> semantic-ID table of a run: one unique code tuple per item, plus its vocabulary."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from padrec import PadrecError
from padrec.files import atomic_write_text
from padrec.tokenizer.vocab import BOS, SEP, SIDVocab


@dataclass
class SemanticIDs:
    codes: np.ndarray  # [num_items, L] int64; row i = codes of dense item i
    vocab: SIDVocab
    info: dict = field(default_factory=dict)  # method, seed, embedding model, stats

    def __post_init__(self):
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or self.codes.shape[1] != self.vocab.levels:
            raise PadrecError(f"codes must be [items, {self.vocab.levels}], got {self.codes.shape}")
        self._item_tokens = [self.vocab.item_tokens(row) for row in self.codes.tolist()]
        self._token_to_item = {t: i for i, t in enumerate(self._item_tokens)}
        if len(self._token_to_item) != len(self._item_tokens):
            raise PadrecError("semantic IDs are not unique: resolve collisions before building the table")

    @property
    def num_items(self) -> int:
        return len(self._item_tokens)

    def item_tokens(self, item: int) -> tuple[int, ...]:
        if not 0 <= item < self.num_items:
            raise PadrecError(f"unknown item index {item} (catalogue has {self.num_items} items)")
        return self._item_tokens[item]

    def all_item_tokens(self) -> list[tuple[int, ...]]:
        return self._item_tokens

    def item_of(self, tokens) -> int | None:
        """The item whose SID is exactly these tokens, or None."""
        return self._token_to_item.get(tuple(int(t) for t in tokens))

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.codes.tobytes())
        h.update(self.vocab.fingerprint().encode())
        return h.hexdigest()[:16]

    def save(self, path: Path) -> None:
        payload = {
            "vocab": self.vocab.to_dict(),
            "info": self.info,
            "fingerprint": self.fingerprint(),
            "codes": self.codes.tolist(),
        }
        atomic_write_text(Path(path), json.dumps(payload))

    @classmethod
    def load(cls, path: Path) -> "SemanticIDs":
        path = Path(path)
        if not path.is_file():
            raise PadrecError(f"semantic-ID file {path} not found")
        try:
            payload = json.loads(path.read_text())
            sids = cls(np.array(payload["codes"], dtype=np.int64), SIDVocab.from_dict(payload["vocab"]), payload["info"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PadrecError(f"semantic-ID file {path} is corrupt: {e}") from e
        if payload.get("fingerprint") != sids.fingerprint():
            raise PadrecError(f"semantic-ID file {path} fails its fingerprint check (edited or corrupt)")
        return sids


def items_to_tokens(items, sids: SemanticIDs, bos: bool = True) -> list[int]:
    """`[BOS] + for each item: its SID tokens + SEP` — the prompt layout every decoder uses."""
    out = [BOS] if bos else []
    for it in items:
        out.extend(sids.item_tokens(it))
        out.append(SEP)
    return out
