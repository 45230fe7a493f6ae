"""EAGLE-style feature-level draft at inference: its sessions (`ReferenceEagleSession` on the Hugging Face modules,
`EagleSession` on the fused path) and the `Draft` wrapper. The model, its formulas and its position and feature
conventions are in drafts/eagle_model.py; a session keeps them: a speculative node at tree depth d sits at position
`committed_len - 1 + d`, and the first committed feature is zeroed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from padrec.drafts.base import Draft, DraftSession
from padrec.drafts.eagle_model import EagleDraftModel, causal_mask
from padrec.drafts.fast_layer import fast_weights, supports_fast_path
from padrec.models.fused_layer import KVBuffer
from padrec.drafts.slots import next_run, slot_of


class _SessionState(DraftSession):
    """What both EAGLE sessions keep besides their KV cache: the committed context's length, the draft's feature
    and logits after its last token, and per speculative node its predicted feature, ancestors-or-self, depth and
    SID run length (for PAD-Rec's slots, `drafts/slots.py`). Also their shared argument checks."""

    def __init__(self, model: EagleDraftModel):
        self.model = model
        self.n_committed = 0
        self.last_feature: torch.Tensor | None = None  # f̂ after the last committed token
        self.last_logits: torch.Tensor | None = None
        self._spec_feat: list[torch.Tensor] = []  # predicted feature of each speculative node
        self._spec_anc: list[list[int]] = []  # speculative ancestors of each node, itself included
        self._spec_depth: list[int] = []
        self.last_run = 0  # run length of SID tokens ending at the last committed token
        self._spec_run: list[int] = []  # ... and at each speculative node
        self._sid_end = getattr(model, "sid_end", None)  # PAD-Rec on an imported model: text ids are not SIDs

    @property
    def num_speculative(self) -> int:
        return len(self._spec_feat)

    def _start_commit(self, tokens: Sequence[int], features) -> int:
        """Drop speculative nodes, check the arguments. Returns the number of tokens (0: nothing to add, the last
        logits stand)."""
        if self._spec_feat:
            self.rollback()
        if len(tokens) == 0 and self.last_logits is None:
            raise ValueError("commit() needs at least one token on an empty session")
        if len(tokens) and features is None:
            raise ValueError("the EAGLE draft needs the target's features for committed tokens")
        return len(tokens)

    def _start_propose(self, parents: Sequence[int], tokens: Sequence[int], depths: Sequence[int]) -> int:
        """Check propose()'s arguments; returns the number of nodes."""
        k = len(tokens)
        if not (len(parents) == k == len(depths)):
            raise ValueError("parents, tokens and depths must have the same length")
        if self.last_feature is None:
            raise ValueError("propose() before any commit()")
        return k

    def _commit_slots(self, tokens: Sequence[int]) -> list[int]:
        """Slots of committed tokens, advancing the committed run length."""
        slots, run = [], self.last_run
        for t in tokens:
            run = next_run(run, int(t), self._sid_end)
            slots.append(slot_of(run, int(t), self.model.levels))
        self.last_run = run
        return slots

    def _check_parent(self, base: int, node: int, parent: int, depth: int) -> None:
        """A node hangs below the last committed token at depth 1, or below a node of an earlier propose() call
        (`base` nodes exist) one level deeper: its parent's predicted feature must already exist."""
        if parent == -1:
            if depth != 1:
                raise ValueError(f"node {node}: a child of the last committed token has depth 1, not {depth}")
            return
        if not 0 <= parent < base:
            raise ValueError(f"node {node}: parent {parent} must be a node of an earlier propose() call "
                             f"(0..{base - 1})")
        if depth != self._spec_depth[parent] + 1:
            raise ValueError(f"node {node}: depth {depth} but its parent {parent} has depth {self._spec_depth[parent]}")

    def _clear_speculative(self) -> None:
        self._spec_feat.clear()
        self._spec_anc.clear()
        self._spec_depth.clear()
        self._spec_run.clear()


def _crop_cache(cache: DynamicCache, keep: int) -> None:
    cur = cache.get_seq_length()
    if cur > keep:
        cache.crop(keep - cur)  # a negative count removes that many tokens (all transformers versions)


class ReferenceEagleSession(_SessionState):
    """One request through the Hugging Face modules (`EagleDraftModel.forward`, a DynamicCache): the layer's KV
    cache over the committed context, then speculative tree nodes. `EagleSession` computes the same function on the
    fused path; this one is what it is checked against, and the fallback for a layer the fused path does not cover.
    """

    def __init__(self, model: EagleDraftModel):
        super().__init__(model)
        self.cache = DynamicCache()

    @torch.inference_mode()
    def commit(self, tokens: Sequence[int], features: torch.Tensor | None) -> torch.Tensor:
        n = self._start_commit(tokens, features)
        if n == 0:
            return self.last_logits
        d, dtype, dev = self.model.cfg.hidden_size, self.model.fc.weight.dtype, self.model.fc.weight.device
        feats = torch.as_tensor(features).to(dev, dtype).reshape(n, d).clone()
        if self.n_committed == 0:
            feats[0] = 0.0  # nothing precedes the first token (BOS); as in training
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=dev)[None]
        pos = torch.arange(self.n_committed, self.n_committed + n, device=dev)[None]
        mask = causal_mask(None, n, self.n_committed, dtype=dtype, device=dev)
        slots = None
        if self.model.needs_slots:
            slots = torch.as_tensor(self._commit_slots(tokens), dtype=torch.long, device=dev)[None]
        out = self.model(ids, feats[None], attention_mask=mask, position_ids=pos, cache=self.cache,
                         depths=torch.zeros(1, n, dtype=torch.long, device=dev), slots=slots)
        self.n_committed += n
        self.last_feature = out[0, -1]
        self.last_logits = self.model.logits(self.last_feature).float()
        return self.last_logits

    @torch.inference_mode()
    def propose(self, parents: Sequence[int], tokens: Sequence[int], depths: Sequence[int]) -> torch.Tensor:
        k = self._start_propose(parents, tokens, depths)
        if k == 0:
            return torch.empty(0, self.model.cfg.vocab_size, device=self.model.fc.weight.device)
        base = len(self._spec_feat)
        feats, ancs, runs = [], [], []
        for j, (p, dep) in enumerate(zip(parents, depths)):
            p, dep = int(p), int(dep)
            self._check_parent(base, base + j, p, dep)
            if p == -1:
                feats.append(self.last_feature)
                ancs.append([base + j])
                runs.append(next_run(self.last_run, int(tokens[j]), self._sid_end))
            else:
                feats.append(self._spec_feat[p])
                ancs.append(self._spec_anc[p] + [base + j])
                runs.append(next_run(self._spec_run[p], int(tokens[j]), self._sid_end))
        C = self.n_committed
        dtype, dev = self.model.fc.weight.dtype, self.model.fc.weight.device
        mask = torch.full((1, 1, k, C + base + k), torch.finfo(dtype).min, dtype=dtype)
        mask[..., :C] = 0.0
        for j, anc in enumerate(ancs):
            mask[0, 0, j, [C + a for a in anc]] = 0.0
        dep_t = torch.as_tensor([int(x) for x in depths], dtype=torch.long, device=dev)[None]
        pos = C - 1 + dep_t
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=dev)[None]
        slots = None
        if self.model.needs_slots:
            L = self.model.levels
            slots = torch.as_tensor([slot_of(r, int(t), L) for r, t in zip(runs, tokens)], dtype=torch.long,
                                    device=dev)[None]
        out = self.model(ids, torch.stack(feats)[None], attention_mask=mask.to(dev), position_ids=pos,
                         cache=self.cache, depths=dep_t, slots=slots)
        for j in range(k):
            self._spec_feat.append(out[0, j])
            self._spec_anc.append(ancs[j])
            self._spec_depth.append(int(depths[j]))
            self._spec_run.append(runs[j])
        return self.model.logits(out[0]).float()

    def rollback(self) -> None:
        _crop_cache(self.cache, self.n_committed)
        self._clear_speculative()


def _in_inference_mode(fn):
    """torch.inference_mode() for a method, without building a context manager when the caller already holds one
    (the speculative decoder does; entering it costs about as much as a small op)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


class EagleSession(_SessionState):
    """One request on the fused inference path (`padrec.drafts.fast_layer`): the same function as
    `ReferenceEagleSession` computed with plain torch ops on the model's weights.

    Keys/values sit in one preallocated buffer, [committed context | speculative nodes in append order], so a
    commit writes in place and a rollback only moves the end. A commit computes keys/values for all its tokens but
    the query, attention, MLP and LM head only for the last one: the session needs the feature and logits after the
    last committed token only, and the keys/values of a token do not depend on its attention output. A speculative
    node whose ancestors are exactly the nodes before it (a chain) attends to the whole buffer, so it needs no mask.
    The model's `extra()` hook (PAD-Rec's position module) is called exactly as `EagleDraftModel.forward` calls it.
    """

    def __init__(self, model: EagleDraftModel):
        super().__init__(model)
        self.w = w = fast_weights(model)
        self.cache = KVBuffer(w.kv_heads, w.head_dim, w.dtype, w.device)
        self._extra = type(model).extra is not EagleDraftModel.extra
        # a model may fold the base fusion and its hook into one map (PAD-Rec with a gate: its own token table) ...
        folded = model.session_fuse(w) if self._extra and hasattr(model, "session_fuse") else None
        self._fold_rows, self._fold = folded if folded is not None else (None, None)
        # ... or offer a cheaper session-time version of the hook (PAD-Rec: tables frozen per session)
        self._session_extra = (model.session_extra() if self._extra and self._fold is None
                               and hasattr(model, "session_extra") else None)
        self._needs_slots = bool(model.needs_slots)
        self._levels = model.levels if self._needs_slots else 0
        self._neg = torch.finfo(w.dtype).min
        self._spec_chain: list[bool] = []  # ancestors-or-self == every node up to itself: no mask needed

    def _long(self, values: list[int]) -> torch.Tensor:
        """[1, n] LongTensor of `values`."""
        if len(values) == 1 and 0 <= values[0] < self.w.arange.shape[0]:
            return self.w.arange[values[0] : values[0] + 1][None]
        return torch.tensor([values], dtype=torch.long, device=self.w.device)

    def _token_rows(self, tokens: list[int], table: torch.Tensor | None = None) -> torch.Tensor:
        table = self.w.token_proj if table is None else table
        if len(tokens) == 1:
            t = tokens[0]
            if not 0 <= t < table.shape[0]:
                raise IndexError(f"token {t} outside the draft's vocabulary of {table.shape[0]}")
            return table[t : t + 1]
        return table.index_select(0, torch.tensor(tokens, dtype=torch.long, device=table.device))

    def _call_extra(self, h: torch.Tensor, slots: list[int] | None, depths: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        slot_t = self._long(slots) if slots is not None else None
        return self.model.extra(h[None], slots=slot_t, depths=depths, position_ids=positions)[0]

    @_in_inference_mode
    def commit(self, tokens: Sequence[int], features: torch.Tensor | None) -> torch.Tensor:
        n = self._start_commit(tokens, features)
        if n == 0:
            return self.last_logits
        w = self.w
        toks = [int(t) for t in tokens]
        feats = features if isinstance(features, torch.Tensor) else torch.as_tensor(features)
        feats = feats.to(w.device, w.dtype).reshape(n, w.d)
        C = self.n_committed
        slots = self._commit_slots(toks) if self._needs_slots else None
        # nothing precedes the first token (BOS): its feature is zeroed, as in training
        if self._fold is not None:
            h = self._fold(self._token_rows(toks, self._fold_rows), feats, slots, [0] * n, zero_first_feature=C == 0)
        else:
            h = w.fuse(self._token_rows(toks), feats, zero_first_feature=C == 0)
            if self._session_extra is not None:
                h = self._session_extra(h, slots, [0] * n)
            elif self._extra:
                zeros = torch.zeros(1, n, dtype=torch.long, device=w.device)
                positions = (self.w.arange[C : C + n] if C + n <= self.w.arange.shape[0]
                             else torch.arange(C, C + n, device=w.device))[None]
                h = self._call_extra(h, slots, zeros, positions)
        x = w.rms(h, w.ln1, w.eps1)
        cos, sin = w.rope_rows(C, C + n)
        H, kvh, hd = w.heads, w.kv_heads, w.head_dim
        if n == 1:
            q, k, v = w.qkv(x, cos, sin)
        else:
            kv = F.linear(x, w.kv_w)
            k = w.rotate(kv[:, : w.kv_width].view(n, kvh, hd), cos, sin)
            v = kv[:, w.kv_width :].view(n, kvh, hd)
            q = w.rotate(F.linear(x[-1:], w.q_w).view(1, H, hd), cos[-1:], sin[-1:])
        self.cache.write(C, k, v)
        feature = w.finish(h[-1:], w.attend(q, self.cache, C + n, None))
        self.n_committed = C + n
        self.last_feature = feature[0]
        self.last_logits = w.logits(feature)[0].float()
        return self.last_logits

    @_in_inference_mode
    def propose(self, parents: Sequence[int], tokens: Sequence[int], depths: Sequence[int]) -> torch.Tensor:
        k = self._start_propose(parents, tokens, depths)
        w = self.w
        if k == 0:
            return torch.empty(0, w.vocab_size, device=w.device)
        base = len(self._spec_feat)
        toks = [int(t) for t in tokens]
        deps = [int(x) for x in depths]
        feats, ancs, runs, chain = [], [], [], []
        track_runs = self._needs_slots
        for j, (p, dep) in enumerate(zip(parents, deps)):
            p = int(p)
            self._check_parent(base, base + j, p, dep)
            if p == -1:
                feats.append(self.last_feature)
                ancs.append([base + j])
                chain.append(base + j == 0)
                if track_runs:
                    runs.append(next_run(self.last_run, toks[j], self._sid_end))
            else:
                feats.append(self._spec_feat[p])
                ancs.append(self._spec_anc[p] + [base + j])
                chain.append(p == base + j - 1 and self._spec_chain[p])
                if track_runs:
                    runs.append(next_run(self._spec_run[p], toks[j], self._sid_end))
        C = self.n_committed
        same_depth = all(x == deps[0] for x in deps)
        f = feats[0][None] if k == 1 else torch.stack(feats)
        slots = [slot_of(r, t, self._levels) for r, t in zip(runs, toks)] if track_runs else None
        if self._fold is not None:
            h = self._fold(self._token_rows(toks, self._fold_rows), f, slots, deps)
        else:
            h = w.fuse(self._token_rows(toks), f)
            if self._session_extra is not None:
                h = self._session_extra(h, slots, deps)
            elif self._extra:
                h = self._call_extra(h, slots, self._long(deps), self._long([C - 1 + x for x in deps]))
        x = w.rms(h, w.ln1, w.eps1)
        if same_depth:  # one row of the table, broadcast over the nodes
            cos, sin = w.rope_rows(C - 1 + deps[0], C + deps[0])
        else:
            cos, sin = w.rope_at(torch.tensor([C - 1 + x for x in deps], dtype=torch.long, device=w.device))
        q, key, value = w.qkv(x, cos, sin)
        start = C + base
        self.cache.write(start, key, value)
        T = start + k
        mask = None
        if not (k == 1 and chain[0]):
            # a node sees the committed context and its own ancestors-or-self among the speculative nodes
            mask = torch.full((k, T), self._neg, dtype=w.dtype, device=w.device)
            mask[:, :C] = 0.0
            flat = [j * T + C + a for j, anc in enumerate(ancs) for a in anc]
            mask.view(-1).index_fill_(0, torch.tensor(flat, dtype=torch.long, device=w.device), 0.0)
            mask = mask[None, None]
        out = w.finish(h, w.attend(q, self.cache, T, mask))
        self._spec_feat.extend(out.unbind(0))
        self._spec_anc.extend(ancs)
        self._spec_depth.extend(deps)
        self._spec_chain.extend(chain)
        if track_runs:
            self._spec_run.extend(runs)
        return w.logits(out).float()

    def rollback(self) -> None:
        self.cache.truncate(self.n_committed)
        self._clear_speculative()
        self._spec_chain.clear()


class EagleDraft(Draft):
    uses_target_features = True
    name = "eagle"

    def __init__(self, model: EagleDraftModel, name: str = "eagle", fast: bool | None = None):
        """`fast`: run sessions on the fused path (`EagleSession`) or through the Hugging Face modules
        (`ReferenceEagleSession`); None picks the fused path whenever it covers the model."""
        self.model = model.eval()
        self.name = name
        why = supports_fast_path(model)
        if fast and why is not None:
            raise ValueError(f"no fused inference path for this draft: {why}")
        self.fast = why is None if fast is None else bool(fast)

    def new_session(self) -> DraftSession:
        return EagleSession(self.model) if self.fast else ReferenceEagleSession(self.model)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size
