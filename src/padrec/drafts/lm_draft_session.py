"""`ModelDraft`: any Hugging Face causal LM over the target's vocabulary, as a `Draft` (independent-LM drafts).

The session keeps its own DynamicCache over the committed context followed by the speculative nodes appended
since the last commit/rollback, in append order:

    cache = [committed tokens 0..n-1 | speculative node 0, 1, ..., S-1]

* `commit(tokens)`: drops the speculative nodes (if any), then one plain causal forward over `tokens` at positions
  n..n+k-1; returns the logits after the last one.
* `propose(parents, tokens, depths)`: one forward over the new nodes with a 4D additive mask over
  [cache | new]: a node sees the whole committed context and its ancestor-or-self speculative nodes only; its
  position is n - 1 + depth (the position it would have if its path were committed).
* `rollback()`: crops the cache back to the n committed positions.

A Llama draft runs on the fused path of `padrec.models.fast_target` (per-layer KV buffers: a rollback only moves
their ends), like the target; other architectures go through Hugging Face with a DynamicCache.

Target features are ignored (`uses_target_features = False`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import model_forward
from padrec.drafts.base import Draft, DraftSession
from padrec.decoding.kv import additive_mask, cache_length, keep_prefix_and, model_dtype_device, session_cache

__all__ = ["ModelDraft", "ModelDraftSession"]


class ModelDraftSession(DraftSession):
    def __init__(self, model, fast: bool | None = None):
        self.model = model
        self.dtype, self.device = model_dtype_device(model)
        self.fast, self._ft, self.cache = session_cache(model, fast)
        self.n = 0  # committed tokens in the cache
        self._anc: list[list[int]] = []  # per speculative node: its ancestor-or-self speculative indices
        self._depth: list[int] = []
        self._last_logits: torch.Tensor | None = None
        self.forwards = 0

    @property
    def num_speculative(self) -> int:
        return len(self._anc)

    def cached_length(self) -> int:
        """Entries in the cache: committed tokens + speculative nodes."""
        return cache_length(self.cache)

    @torch.inference_mode()
    def commit(self, tokens: Sequence[int], features: torch.Tensor | None = None) -> torch.Tensor:
        self.rollback()
        tokens = [int(t) for t in tokens]
        if not tokens:
            if self._last_logits is None:
                raise PadrecError("commit() of no tokens before anything was committed")
            return self._last_logits
        if self.fast:
            logits, _ = self._ft.forward(self.cache, tokens, self.n, head_rows=slice(-1, None))
            last = logits[-1]
        else:
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            pos = torch.arange(self.n, self.n + len(tokens), device=self.device)[None]
            logits, self.cache = model_forward(self.model, ids, self.cache, position_ids=pos, last_only=True)
            last = logits[0, -1]
        self.forwards += 1
        self.n += len(tokens)
        self._last_logits = last
        return self._last_logits

    @torch.inference_mode()
    def propose(self, parents: Sequence[int], tokens: Sequence[int], depths: Sequence[int]) -> torch.Tensor:
        if not (len(parents) == len(tokens) == len(depths)):
            raise PadrecError("propose(): parents, tokens and depths differ in length")
        if self.n == 0:
            raise PadrecError("propose() before any commit(): speculative nodes need a committed token to hang below")
        k = len(tokens)
        if k == 0:
            return torch.empty(0, 0)
        s = len(self._anc)
        for j, (p, d) in enumerate(zip(parents, depths)):
            p, d = int(p), int(d)
            if not -1 <= p < s + j:
                raise PadrecError(f"propose(): parent {p} of new node {s + j} is not an earlier node")
            expect = 1 if p < 0 else self._depth[p] + 1
            if d != expect:
                raise PadrecError(f"propose(): node {s + j} at depth {d}, but its parent sits at depth {expect - 1}")
            self._anc.append(([] if p < 0 else self._anc[p]) + [s + j])
            self._depth.append(d)
        past = self.n + s
        positions = [self.n - 1 + int(d) for d in depths]
        self.forwards += 1
        if self.fast and k == 1 and len(self._anc[s]) == s + 1:
            # a chain node: it sees everything before it, at the next position (causal attention, no mask)
            logits, _ = self._ft.forward(self.cache, [int(tokens[0])], past, None if positions[0] == past else positions)
            return logits
        visible = torch.zeros(k, past + k, dtype=torch.bool)
        visible[:, : self.n] = True
        for j in range(k):
            visible[j, [self.n + a for a in self._anc[s + j]]] = True
        if self.fast:
            return self._ft.forward(self.cache, [int(t) for t in tokens], past, positions, visible)[0]
        mask = additive_mask(visible.to(self.device), self.dtype)
        pos = torch.tensor([positions], device=self.device)
        ids = torch.tensor([[int(t) for t in tokens]], dtype=torch.long, device=self.device)
        logits, self.cache = model_forward(self.model, ids, self.cache, mask, pos, last_only=False)
        return logits[0]

    def rollback(self) -> None:
        s = len(self._anc)
        if s:
            keep_prefix_and(self.cache, self.n, [])  # either cache kind: drop the speculative tail
        self._anc = []
        self._depth = []


class ModelDraft(Draft):
    """Wrap a causal LM sharing the target's vocabulary (e.g. a small independently trained LM, or the target
    itself for testing) as a draft. `fast`: as `ModelDraftSession`'s (default: the fused path when possible)."""

    uses_target_features = False

    def __init__(self, model, name: str = "lm", fast: bool | None = None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.name = name
        self.fast = fast

    def new_session(self) -> ModelDraftSession:
        return ModelDraftSession(self.model, self.fast)

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings()
        if head is not None and hasattr(head, "weight"):
            return int(head.weight.shape[0])
        return int(self.model.config.vocab_size)
