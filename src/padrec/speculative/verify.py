"""Target-side verification of a draft tree, and the (model-agnostic) acceptance rules.

`TargetSession` holds the target's KV cache (the fused path's buffers or a DynamicCache) over the committed
context. A verification is one forward over

    pending tokens p_0 .. p_{m-1}   (committed, not yet fed to the target: the last round's bonus token and the
                                     tokens the constraint forced after it; the prompt's last token in round 1)
    tree nodes     n_0 .. n_{N-1}   (hanging below p_{m-1}, parents before children)

with a 4D additive mask: the cached context is visible to all, pending tokens are a causal chain, a tree node sees
all pending tokens and its ancestor-or-self nodes. Positions: C + i for p_i, C + m - 1 + depth for a node (C = the
cached length). The pass returns, for every fed token, the next-token logits and the feature (last hidden state
after the final norm). `keep(path)` then keeps only the pending tokens and the accepted path in the cache.

Acceptance walks the tree from the root (= after p_{m-1}); at each node the target's constrained distribution is
computed from the node's logits and the node's constraint state with the same code as autoregressive decoding.

Greedy: the target's choice is the constrained arg-max (ties -> the smallest token id), exactly `generate_list`'s
`choose_token`; if a child carries that token it is accepted and the walk continues, otherwise the choice is the bonus
token. So the committed tokens are exactly the autoregressive greedy tokens.

Sampling (multi-candidate recursive rejection with deterministic candidates): at a node with target distribution p
(`apply_logits_processing(logits, allowed, cfg)`: constraint, temperature, top-k, top-p) and children x_1..x_c in
draft proposal order, keep a residual r := p and for each x_j in turn: accept x_j with probability
r(x_j) / sum(r); on rejection set r(x_j) := 0. If all are rejected, the bonus token is drawn from r / sum(r).

Why this is exactly p. The candidates x_1..x_c are fixed before the target's numbers for this node are drawn:
they depend only on the history (committed tokens, earlier rounds' random numbers, the draft's computation), never
on the uniforms used at this node. So they act as point-mass proposals q_j = delta(x_j): the standard speculative rule
accepts with min(1, r(x_j) / q_j(x_j)) = r(x_j) (r normalised) and continues with the residual
norm(max(r - q_j, 0)) = r with x_j removed - the rule above. Directly, by induction on
the number c of candidates with the invariant "the output is distributed as r / sum(r)": for c = 0 the output is a
draw from r / sum(r). For c >= 1, with R = sum(r): P(out = x_1) = r(x_1) / R; for y != x_1,
P(out = y) = (1 - r(x_1) / R) * r'(y) / R' where r' = r without x_1 and R' = R - r(x_1) (the induction hypothesis
for the remaining c - 1 candidates), i.e. (R' / R) * r(y) / R' = r(y) / R. So the token emitted at every node is
distributed as the target's p given the committed prefix, and the fresh uniforms used there are independent of
everything before; by the chain rule the whole list is distributed exactly as under autoregressive sampling from
the target. (Using the draft's own q in min(1, p/q) would be wrong here: the candidates are the draft's top-k,
not samples from q.) Forced nodes (a single allowed token) and candidates with r(x) = 0 or r(x) = R are decided
without a random draw; all other tests draw one uniform each, the bonus one more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import (
    GenerationConfig,
    choose_token,
    apply_logits_processing,
    sample_from_logprobs,
)
from padrec.decoding.kv import (
    additive_mask,
    cache_length,
    decoder_forward,
    keep_positions,
    keep_prefix_and,
    model_dtype_device,
    session_cache,
)
from padrec.speculative.tree import DraftTree

__all__ = ["TargetSession", "accept_greedy", "accept_sampling", "accept_tree"]


class TargetSession:
    """The target's KV cache over the committed context; tree verification in one forward per round.

    `fast`: run the target on the fused path (`padrec.models.fast_target`, per-layer `KVBuffer`s; default whenever
    the model allows it) or through Hugging Face with a DynamicCache (False)."""

    def __init__(self, model, fast: bool | None = None):
        self.model = model
        self.dtype, self.device = model_dtype_device(model)
        self.fast, self._ft, self.cache = session_cache(model, fast)
        self.length = 0  # committed tokens in the cache
        self.forwards = 0
        self._last: tuple[int, int] | None = None  # (pending, nodes) of the last verify, for keep()

    def cached_length(self) -> int:
        """Entries in the cache (committed + not yet kept/dropped)."""
        return cache_length(self.cache)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed committed tokens causally. Returns (next-token logits after the last one [V], features [n, d])."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise PadrecError("prefill() of no tokens")
        if self.fast:
            logits, hidden = self._ft.forward(self.cache, tokens, self.length, head_rows=slice(-1, None))
        else:
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            pos = torch.arange(self.length, self.length + len(tokens), device=self.device)[None]
            logits, hidden = decoder_forward(self.model, ids, self.cache, None, pos, head_rows=slice(-1, None))
            logits, hidden = logits[0], hidden[0]
        self.forwards += 1
        self.length += len(tokens)
        self._last = None
        return logits[-1], hidden

    @torch.inference_mode()
    def verify(self, pending: Sequence[int], tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over pending tokens + tree nodes. Returns logits [m + N, V] and features [m + N, d], rows in
        feed order (pending first, then the nodes in tree order)."""
        pending = [int(t) for t in pending]
        m, n = len(pending), len(tree)
        if m == 0 and self.length == 0:
            raise PadrecError("verify() needs a committed token to hang the tree below")
        if m + n == 0:
            raise PadrecError("verify() of nothing")
        c = self.length
        q = m + n
        visible = torch.zeros(q, c + q, dtype=torch.bool)
        visible[:, :c] = True
        visible[:m, c : c + m] = torch.ones(m, m, dtype=torch.bool).tril_()
        visible[m:, c : c + m] = True
        if n:
            visible[m:, c + m :] = tree.ancestors()
        pos = list(range(c, c + m)) + [c + m - 1 + d for d in tree.depths]
        logits, hidden = self.forward_masked(pending + list(tree.tokens), visible, pos)
        self._last = (m, n)
        return logits, hidden

    @torch.inference_mode()
    def forward_masked(self, tokens: Sequence[int], visible: torch.Tensor, positions: Sequence[int],
                       head_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of new tokens under an explicit visibility: bool `visible` [q, cached + q] (row i: what new
        token i may attend to, cached columns first), position ids `positions` [q]. The q keys/values are appended
        to the cache; `length` is unchanged (call `keep` / `keep_columns` next). Returns logits [q' , V] of the rows
        `head_rows` (all when None) and features [q, d]. Used by `verify` and by speculative beam search, whose
        committed context is a tree of beams rather than one sequence."""
        self.forwards += 1
        if self.fast:
            # appended after whatever is cached, like HF's cache
            return self._ft.forward(self.cache, [int(t) for t in tokens], self.cached_length(), positions, visible,
                                    head_rows)
        ids = torch.tensor([[int(t) for t in tokens]], dtype=torch.long, device=self.device)
        mask = additive_mask(visible.to(self.device), self.dtype)
        pos_t = torch.tensor([list(positions)], dtype=torch.long, device=self.device)
        logits, hidden = decoder_forward(self.model, ids, self.cache, mask, pos_t, head_rows)
        return logits[0], hidden[0]

    def keep_columns(self, columns: Sequence[int]) -> None:
        """Keep only these cache columns (strictly increasing), e.g. the prompt and the ancestors of live beams."""
        keep_positions(self.cache, columns)
        self.length = len(columns)
        self._last = None

    @torch.inference_mode()
    def keep(self, path: Sequence[int]) -> None:
        """After `verify`: keep the pending tokens and the accepted tree nodes `path` (root to leaf) in the cache."""
        if self._last is None:
            raise PadrecError("keep() without a preceding verify()")
        m, n = self._last
        base = self.length + m
        path = [int(j) for j in path]
        if any(not 0 <= j < n for j in path):
            raise PadrecError(f"keep(): path {path} outside the {n} verified nodes")
        if any(b <= a for a, b in zip(path, path[1:])):
            raise PadrecError("keep_positions needs strictly increasing, non-negative positions")
        keep_prefix_and(self.cache, base, [base + j for j in path])
        self.length = base + len(path)
        self._last = None


# ------------------------------------------------------------------------------------------------------------
# acceptance
# ------------------------------------------------------------------------------------------------------------
def _row(root_logits, node_logits, node):
    return root_logits if node < 0 else node_logits[node]


def accept_greedy(
    tree: DraftTree, root_logits: torch.Tensor, node_logits: torch.Tensor, cfg: GenerationConfig, limit: int
) -> tuple[list[int], int | None]:
    """Greedy walk. Returns (accepted node indices root to leaf, bonus token or None when the path already holds
    `limit` tokens, i.e. the list is complete)."""
    path: list[int] = []
    node = -1
    top: list[int] | None = None  # unconstrained arg-max of the root row, then of every node row
    while True:
        if len(path) >= limit:
            return path, None
        toks, tensor = tree.constraint_at(node).allowed_with_tensor()
        if len(toks) == 1:
            choice = toks[0]
        else:
            # The constrained arg-max (`choose_token`: first maximum among the allowed tokens, which are sorted) is the
            # unconstrained one whenever that is allowed: it is the smallest token holding the global maximum, so
            # no allowed token before it can tie. One arg-max over all rows replaces a gather + arg-max per node.
            if top is None:
                top = [int(root_logits.argmax())] + (node_logits.argmax(-1).tolist() if len(node_logits) else [])
            choice = top[node + 1]
            if choice not in toks:
                row = _row(root_logits, node_logits, node)
                choice = choose_token(row, toks, tensor.to(row.device), cfg, None)
        child = tree.child_by_token(node).get(choice)
        if child is None:
            return path, choice
        path.append(child)
        node = child


def accept_sampling(
    tree: DraftTree,
    root_logits: torch.Tensor,
    node_logits: torch.Tensor,
    cfg: GenerationConfig,
    limit: int,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int | None]:
    """Recursive rejection sampling over each node's children (see the module docstring)."""
    path: list[int] = []
    node = -1
    while True:
        if len(path) >= limit:
            return path, None
        toks, tensor = tree.constraint_at(node).allowed_with_tensor()
        kids = tree.children.get(node, ())
        if len(toks) == 1:
            if kids:
                path.append(kids[0])
                node = kids[0]
                continue
            return path, toks[0]
        row = _row(root_logits, node_logits, node)
        r = apply_logits_processing(row, tensor.to(row.device), cfg).detach().to("cpu", torch.float64).exp()
        pos = {t: i for i, t in enumerate(toks)}
        accepted = None
        for child in kids:
            i = pos[tree.tokens[child]]
            ri = float(r[i])
            if ri <= 0.0:
                continue
            total = float(r.sum())
            if ri >= total:  # the only token left in the residual's support
                accepted = child
                break
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if u * total < ri:
                accepted = child
                break
            r[i] = 0.0
        if accepted is not None:
            path.append(accepted)
            node = accepted
            continue
        return path, toks[int(sample_from_logprobs(r.log(), generator))]


def accept_tree(tree, root_logits, node_logits, cfg: GenerationConfig, limit: int, generator=None):
    if cfg.do_sample:
        return accept_sampling(tree, root_logits, node_logits, cfg, limit, generator)
    return accept_greedy(tree, root_logits, node_logits, cfg, limit)
