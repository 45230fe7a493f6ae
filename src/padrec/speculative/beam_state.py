"""KV bookkeeping for speculative beam search, where the committed context is a prompt plus a *tree* of beams.

Nodes are named by their SID prefix (a tuple of tokens; `()` is the root, i.e. the end of the prompt). A prefix
identifies one node whichever round or model created it, so the target, the draft and the walks agree on names
without index translation.

`TargetBeamTree` keeps the target's cache as [prompt | fed nodes]: every node in the cache sees the prompt and its
own cached ancestors only (tree attention), and sits at position len(prompt) + depth - 1, exactly where plain beam
search puts it. One `feed` = one target forward (`TargetSession.forward_masked`); `trim` then keeps the prompt and
the ancestors of the live beams, so the cache never holds more than the prompt plus K paths between rounds.

`DraftBeamTree` drives any `DraftSession`: the prompt is committed once, every node is a speculative node hanging
below the prompt (depth = prefix length). Nodes are never rolled back during one search: a node proposed in one round
(with its logits) is reused in later rounds, and a missing node is proposed together with its missing ancestors,
shallowest first (one propose call per depth, so feature-level drafts always find their parent's predicted feature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from padrec.drafts.base import Draft
from padrec.speculative.verify import TargetSession

Prefix = tuple[int, ...]


class Beam(NamedTuple):
    score: float
    seq: Prefix
    node: int  # trie node of seq


def _prefixes(seq: Prefix):
    return (seq[:i] for i in range(1, len(seq) + 1))


class TargetBeamTree:
    def __init__(self, model):
        # on the same target path as plain beam search at batch 1 (`beam_search_items`: fused when the model allows
        # it), so speedups compare like with like and scores share one arithmetic path
        self.sess = TargetSession(model)
        self.n_prompt = 0  # prompt columns in the cache (0 until the first feed)
        self.col: dict[Prefix, int] = {}  # cache column of every fed node
        self.logits: dict[Prefix, torch.Tensor] = {}  # next-token logits of fed nodes (root: after the prompt)

    @property
    def forwards(self) -> int:
        return self.sess.forwards

    def feed(self, prompt: Sequence[int] | None, nodes: Sequence[Prefix]) -> torch.Tensor:
        """One target forward over the prompt (first call only: a causal chain) and `nodes` (parents before children;
        a parent is either fed earlier or in `nodes`). Stores each node's logits. Returns the features of the fed
        tokens [q, d] (the prompt's first, when fed)."""
        c = self.sess.length
        prompt = [int(t) for t in prompt] if prompt else []
        m = len(prompt)
        n_p = m or self.n_prompt
        index: dict[Prefix, int] = {}
        tokens, positions = list(prompt), list(range(m))
        groups: dict[int, tuple[list[int], list[int]]] = {}  # prefix length -> (rows, in-block parent rows)
        cached_rows: list[int] = []
        cached_cols: list[int] = []
        for seq in nodes:
            j = len(tokens)
            par = seq[:-1]
            parent = index.get(par, m - 1 if not par and m else -1)
            if parent >= 0:
                rows, prow = groups.setdefault(len(seq), ([], []))
                rows.append(j)
                prow.append(parent)
            for p in _prefixes(par):
                col = self.col.get(p)
                if col is not None:
                    cached_rows.append(j)
                    cached_cols.append(col)
            index[seq] = j
            tokens.append(seq[-1])
            positions.append(n_p + len(seq) - 1)
        q = len(tokens)
        # ancestor-or-self inside the block: the prompt is a causal chain; nodes inherit their parent's row, built
        # shallowest first (parents always precede their children in `nodes`)
        anc = torch.eye(q, dtype=torch.bool)
        anc[:m, :m] = torch.ones(m, m, dtype=torch.bool).tril_()
        for length in sorted(groups):
            rows, prow = groups[length]
            anc[rows] |= anc[prow]
        visible = torch.zeros(q, c + q, dtype=torch.bool)
        visible[:, c:] = anc
        visible[m:, : self.n_prompt] = True
        if cached_rows:
            visible[cached_rows, cached_cols] = True
        head = slice(len(prompt) - 1, None) if prompt else None
        logits, hidden = self.sess.forward_masked(tokens, visible, positions, head)
        if prompt:
            self.n_prompt = len(prompt)
            self.logits[()] = logits[0]
            logits = logits[1:]
        for seq, row in zip(nodes, logits):
            self.col[seq] = c + index[seq]
            self.logits[seq] = row
        self.sess.length = c + q
        return hidden

    def trim(self, live: Sequence[Prefix]) -> None:
        """Keep the prompt and the fed ancestors-or-self of the `live` beams; forget every other node."""
        keep = {p for seq in live for p in _prefixes(seq) if p in self.col}
        order = sorted(keep, key=self.col.__getitem__)
        self.sess.keep_columns(list(range(self.n_prompt)) + [self.col[p] for p in order])
        self.col = {p: self.n_prompt + i for i, p in enumerate(order)}
        live_set = set(live)
        self.logits = {p: r for p, r in self.logits.items() if p in live_set}


class DraftBeamTree:
    def __init__(self, draft: Draft):
        self.session = draft.new_session()
        self.index: dict[Prefix, int] = {}  # speculative-node index of every proposed node
        self.logits: dict[Prefix, torch.Tensor] = {}
        self.calls = 0

    def commit_prompt(self, prompt: Sequence[int], features: torch.Tensor | None) -> None:
        self.logits[()] = self.session.commit(list(prompt), features)
        self.calls += 1

    def logits_at(self, seqs: Sequence[Prefix]) -> torch.Tensor:
        """The draft's next-token logits [len(seqs), V] at these nodes, proposing what is missing."""
        need = sorted({p for seq in seqs if seq not in self.logits for p in _prefixes(seq) if p not in self.index},
                      key=lambda p: (len(p), p))
        start = 0
        while start < len(need):
            depth = len(need[start])
            end = start
            while end < len(need) and len(need[end]) == depth:
                end += 1
            group = need[start:end]
            out = self.session.propose([self.index[p[:-1]] if depth > 1 else -1 for p in group],
                                       [p[-1] for p in group], [depth] * len(group))
            self.calls += 1
            base = len(self.index)
            for j, p in enumerate(group):
                self.index[p] = base + j
                self.logits[p] = out[j]
            start = end
        return torch.stack([self.logits[s] for s in seqs])
