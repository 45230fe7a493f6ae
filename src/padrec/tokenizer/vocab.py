"""Token vocabulary of a semantic-ID recommender.

Ids 0..3 are PAD, BOS, EOS, SEP. Then SID tokens, in one of two layouts:
  per_level  one token per (level, code): `<a_12>` only ever appears at level 0 — the token reveals its slot.
  shared     one token per code, reused at every level: `<12>` — as when codes reuse a pretrained LLM's tokens.
An item is written as its L code tokens followed by SEP.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from padrec import PadrecError

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")
NUM_SPECIAL = len(SPECIAL_TOKENS)
LAYOUTS = ("per_level", "shared")
_LEVEL_NAMES = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SIDVocab:
    codebook_sizes: tuple[int, ...]  # codes per level, L entries
    layout: str = "per_level"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise PadrecError(f"unknown vocabulary layout {self.layout!r}: expected one of {LAYOUTS}")
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise PadrecError("codebook sizes must be positive, one per level")

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def tokens_per_item(self) -> int:
        return self.levels + 1

    @property
    def _offsets(self) -> list[int]:
        if self.layout == "shared":
            return [NUM_SPECIAL] * self.levels
        offs, acc = [], NUM_SPECIAL
        for size in self.codebook_sizes:
            offs.append(acc)
            acc += size
        return offs

    @property
    def size(self) -> int:
        if self.layout == "shared":
            return NUM_SPECIAL + max(self.codebook_sizes)
        return NUM_SPECIAL + sum(self.codebook_sizes)

    def token_id(self, level: int, code: int) -> int:
        if not 0 <= code < self.codebook_sizes[level]:
            raise PadrecError(f"code {code} out of range for level {level} (size {self.codebook_sizes[level]})")
        return self._offsets[level] + code

    def item_tokens(self, codes) -> tuple[int, ...]:
        """SID token ids of one item (without the separator)."""
        if len(codes) != self.levels:
            raise PadrecError(f"an item needs {self.levels} codes, got {len(codes)}")
        offs = self._offsets
        return tuple(offs[level] + int(c) for level, c in enumerate(codes))

    def token_str(self, token: int) -> str:
        if token < NUM_SPECIAL:
            return SPECIAL_TOKENS[token]
        if self.layout == "shared":
            return f"<{token - NUM_SPECIAL}>"
        for level, (off, size) in enumerate(zip(self._offsets, self.codebook_sizes)):
            if off <= token < off + size:
                return f"<{_LEVEL_NAMES[level]}_{token - off}>"
        raise PadrecError(f"token id {token} outside the vocabulary of size {self.size}")

    def to_dict(self) -> dict:
        return {"codebook_sizes": list(self.codebook_sizes), "layout": self.layout}

    @classmethod
    def from_dict(cls, d: dict) -> "SIDVocab":
        return cls(tuple(d["codebook_sizes"]), d["layout"])

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
