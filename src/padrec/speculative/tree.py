"""Draft tree construction (EAGLE-2 style dynamic trees, and chains).

Every node carries a copy of the list constraint advanced along its path, so the draft only ever proposes valid
continuations (catalogue prefixes, SEP where due, no banned or duplicate items). The draft distribution at a node is
`apply_logits_processing(draft_logits, allowed, cfg)` - the very processing the target's distribution gets (the
constraint, and with sampling temperature / top-k / top-p). A forced node (one allowed token) gives its child
log-prob 0 without looking at the draft.

Construction, `depth` levels (at most `max_depth`, the tokens the list still needs):
  level 1: the `top_k` best children of the root (the last committed token) by draft log-prob;
  level d+1: the `top_k` level-d nodes with the best cumulative draft log-prob are expanded (one `propose()` call
             of the draft for all of them), each into its `top_k` best children (zero-probability ones are skipped).
Finally the `total_tokens` best nodes by cumulative log-prob are kept. Ties break by (depth, creation order), and a
child's cumulative score never exceeds its parent's (log-probs are <= 0), so the kept set is ancestor-closed.
A chain is the same with top_k = 1 and a budget of `depth` nodes.

With `score="calibrated"` a candidate's score is instead log P(the target takes it), from the draft's
`AcceptanceModel` (by item slot, the draft's margin at the node and the candidate's rank; see
speculative/calibration.py): the candidates and their order are still the draft's top-k, only which of them are
expanded and kept changes. `min_accept` then also stops the tree where the estimated acceptance of a whole path
falls below it (at least one node is always kept).

Children of a node are listed in draft proposal order: descending draft log-prob, ties to the smaller token id.
"""

from __future__ import annotations

import re

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import GenerationConfig, apply_logits_processing
from padrec.decoding.trie import ListConstraint
from padrec.decoding.kv import ancestor_matrix

__all__ = ["TreeConfig", "DraftTree", "build_tree", "proposal_order"]

TREE_KINDS = ("tree", "chain")
TREE_SCORES = ("draft", "calibrated")


@dataclass(frozen=True)
class TreeConfig:
    kind: str = "tree"  # "tree" (dynamic, EAGLE-2) or "chain" (depth gamma, one candidate per level)
    depth: int = 5
    top_k: int = 4  # branching: nodes expanded per level and children per expanded node
    total_tokens: int = 24  # node budget of the final tree
    # how candidates are scored for expansion and the budget: "draft" (the draft's log-prob, EAGLE-2) or
    # "calibrated" (log P(the target accepts it) from the draft's `AcceptanceModel`, see speculative/calibration.py)
    score: str = "draft"
    # calibrated trees only: grow no level, and keep no node, whose estimated acceptance probability is below this.
    # A node is worth its draft step and verified token only if it adds enough expected accepted tokens (on a CPU,
    # roughly tau * its cost / a round's cost, ~0.2-0.4), so the tree is deep when the draft is sure, shallow not
    min_accept: float = 0.0

    def __post_init__(self):
        if self.kind not in TREE_KINDS:
            raise PadrecError(f"unknown tree kind {self.kind!r}: expected one of {TREE_KINDS}")
        if self.score not in TREE_SCORES:
            raise PadrecError(f"unknown tree score {self.score!r}: expected one of {TREE_SCORES}")
        if not 0.0 <= self.min_accept < 1.0 or (self.min_accept and self.score != "calibrated"):
            raise PadrecError(f"min_accept must be in [0, 1) and needs a calibrated tree, got {self.min_accept}")
        if self.depth < 1:
            raise PadrecError(f"tree depth must be >= 1, got {self.depth}")
        if self.kind == "tree" and (self.top_k < 1 or self.total_tokens < 1):
            raise PadrecError(f"tree top_k and total_tokens must be >= 1, got {self.top_k}, {self.total_tokens}")

    @classmethod
    def chain(cls, depth: int = 5) -> "TreeConfig":
        return cls(kind="chain", depth=depth, top_k=1, total_tokens=depth)

    @classmethod
    def parse_list(cls, chains: str | None, trees: str | None) -> list["TreeConfig"]:
        """Command-line shapes: chains "3,5" (γ values), trees "5,4,24;6,6,32" (DEPTH,TOPK,TOTAL each; a fourth
        field "cal" scores the tree by calibrated acceptance, "cal@P" also drops what is accepted with probability
        below P: "10,2,14,cal", "16,1,16,cal@0.3")."""
        out = [cls.chain(int(g)) for g in (chains or "").split(",") if g.strip()]
        for spec in filter(None, (trees or "").split(";")):
            fields = [x.strip() for x in spec.split(",")]
            score, min_accept = "draft", 0.0
            try:
                if len(fields) == 4 and fields[3].startswith("cal"):
                    score = "calibrated"
                    rest = fields.pop()[3:]
                    if rest:
                        if not rest.startswith("@"):
                            raise ValueError(rest)
                        min_accept = float(rest[1:])
                depth, top_k, total = (int(x) for x in fields)
            except ValueError as e:
                raise PadrecError(f"a tree is DEPTH,TOPK,TOTAL[,cal[@P]] (three integers), got {spec!r}") from e
            out.append(cls(kind="tree", depth=depth, top_k=top_k, total_tokens=total, score=score,
                           min_accept=min_accept))
        return out

    @classmethod
    def from_label(cls, label: str) -> "TreeConfig":
        """The inverse of `label` ("chain8", "tree16x4/48cal@0.1"), e.g. for a configuration named in a result."""
        m = re.fullmatch(r"chain(\d+)|tree(\d+)x(\d+)/(\d+)(cal(?:@([\d.]+))?)?", label.strip())
        if not m:
            raise PadrecError(f"not a tree label: {label!r} (expected chainN or treeDxK/T[cal[@P]])")
        if m[1]:
            return cls.chain(int(m[1]))
        return cls(kind="tree", depth=int(m[2]), top_k=int(m[3]), total_tokens=int(m[4]),
                   score="calibrated" if m[5] else "draft", min_accept=float(m[6]) if m[6] else 0.0)

    @property
    def label(self) -> str:
        if self.kind == "chain":
            return f"chain{self.depth}"
        cal = "" if self.score != "calibrated" else "cal" + (f"@{self.min_accept:g}" if self.min_accept else "")
        return f"tree{self.depth}x{self.top_k}/{self.total_tokens}{cal}"

    @property
    def branching(self) -> int:
        return 1 if self.kind == "chain" else self.top_k

    @property
    def budget(self) -> int:
        return self.depth if self.kind == "chain" else self.total_tokens


@dataclass
class DraftTree:
    """A draft tree below the last committed token (the root, index -1). Nodes are ordered by depth, so a parent
    always precedes its children."""

    root: ListConstraint  # constraint state at the root (a snapshot: the caller's constraint moves on)
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1: child of the root
    depths: list[int] = field(default_factory=list)  # 1 = child of the root
    scores: list[float] = field(default_factory=list)  # cumulative draft log-prob
    constraints: list[ListConstraint] = field(default_factory=list)  # state after the node's token
    children: dict[int, list[int]] = field(default_factory=dict)  # node (-1 root) -> children, proposal order
    # expanded nodes (root -1 included): (allowed tokens, draft log-probs over them) - the draft distribution q
    draft_logprobs: dict[int, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)
    propose_calls: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def constraint_at(self, node: int) -> ListConstraint:
        return self.root if node < 0 else self.constraints[node]

    def child_by_token(self, node: int) -> dict[int, int]:
        return {self.tokens[c]: c for c in self.children.get(node, ())}

    def ancestors(self) -> torch.Tensor:
        return ancestor_matrix(self.parents)

    def path_tokens(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]


ProposeFn = Callable[[Sequence[int], Sequence[int], Sequence[int]], torch.Tensor]


def _node_distribution(logits_row: torch.Tensor | None, cons: ListConstraint, cfg: GenerationConfig,
                       to_cpu: bool = True):
    """Allowed tokens and the draft's log-probabilities over them (float64 on the CPU, or as computed)."""
    toks, tensor = cons.allowed_with_tensor()
    if len(toks) == 1:
        return toks, torch.zeros(1, dtype=torch.float64)
    lp = apply_logits_processing(logits_row, tensor.to(logits_row.device), cfg)
    return toks, (lp.detach().to("cpu", torch.float64) if to_cpu else lp)


def proposal_order(vals: list[float]) -> list[int]:
    """Indices of a node's allowed tokens (sorted ascending) in draft proposal order: best log-prob first, ties to
    the smaller token. A reverse sort is stable, so this is sorted(key=(-value, token)) without a Python key
    function per allowed token."""
    return sorted(range(len(vals)), key=vals.__getitem__, reverse=True)


class _Candidates:
    """Every node considered while building one tree: token, parent candidate, depth, score and (built when
    needed) constraint, indexed by creation order; -1 is the root."""

    def __init__(self, constraint: ListConstraint, cfg: GenerationConfig, tree_cfg: TreeConfig, acceptance):
        self.root, self.cfg, self.k = constraint, cfg, tree_cfg.branching
        self.calibrated, self.acceptance = tree_cfg.score == "calibrated", acceptance
        self.tok: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.score: list[float] = []
        # a candidate's constraint is built when it is needed (expanded, or kept in the tree): most candidates of a
        # wide tree are neither, and copying + advancing a constraint is the costliest step per candidate
        self.cons: list[ListConstraint | None] = []
        self.children: dict[int, list[int]] = {}
        self.q: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.tok)

    def cons_of(self, c: int) -> ListConstraint:
        cons = self.cons[c]
        if cons is None:
            p = self.parent[c]
            cons = (self.root if p < 0 else self.cons_of(p)).copy()
            cons.advance(self.tok[c])
            self.cons[c] = cons
        return cons

    def _best(self, logits_row, cons: ListConstraint):
        """(allowed tokens, their log-probs, the k best as (index, value), the draft's margin or None)."""
        margin = None
        if self.k == 1:  # a chain: only the best token (the first maximum: ties to the smaller token, sorted toks)
            toks, lp = _node_distribution(logits_row, cons, self.cfg, to_cpu=False)
            i = int(lp.argmax())
            best = [(i, float(lp[i]))]
            if self.calibrated and len(toks) > 1:
                top2 = torch.topk(lp, 2).values
                margin = float(top2[0] - top2[1])
        else:
            toks, lp = _node_distribution(logits_row, cons, self.cfg)
            vals = lp.tolist()
            order = proposal_order(vals)
            best = [(i, vals[i]) for i in order[: self.k]]
            if len(order) > 1:
                margin = vals[order[0]] - vals[order[1]]
        return toks, lp, best, margin

    def expand(self, cand: int, logits_row, cons: ListConstraint, base: float, d: int) -> None:
        """Add the k best children of `cand` (at depth d, score `base`) from the draft's logits there."""
        toks, lp, best, margin = self._best(logits_row, cons)
        if self.calibrated and len(toks) > 1:  # the same candidates and order, scored by estimated acceptance
            scores = self.acceptance.rank_logprobs(cons.position, margin, len(best))
            best = [(i, s if v > -math.inf else v) for (i, v), s in zip(best, scores)]
        self.q[cand] = (toks, lp)
        kids = self.children.setdefault(cand, [])
        for i, val in best:
            if val == -math.inf:
                break
            kids.append(len(self.tok))
            self.tok.append(toks[i])
            self.parent.append(cand)
            self.depth.append(d + 1)
            self.score.append(base + val)
            self.cons.append(None)

    def child_bound(self, c: int) -> float:
        """The best score a child of `c` could add (calibrated trees)."""
        cons = self.cons_of(c)
        return 0.0 if len(cons.allowed_with_tensor()[0]) == 1 else self.acceptance.best_logprob(cons.position)

    def to_tree(self, keep: list[int], calls: int) -> DraftTree:
        """The kept candidates (ancestor-closed), breadth first, as a DraftTree."""
        keep = sorted(keep, key=lambda c: (self.depth[c], c))
        index = {c: i for i, c in enumerate(keep)}
        tree = DraftTree(root=self.root.copy(), propose_calls=calls)
        for c in keep:
            p = self.parent[c]
            if p >= 0 and p not in index:  # cannot happen (see the module docstring); guard the invariant
                raise PadrecError("internal error: draft tree budget selection is not ancestor-closed")
            tree.tokens.append(self.tok[c])
            tree.parents.append(-1 if p < 0 else index[p])
            tree.depths.append(self.depth[c])
            tree.scores.append(self.score[c])
            tree.constraints.append(self.cons_of(c))
        for cand, kids in self.children.items():
            if cand >= 0 and cand not in index:
                continue
            node = -1 if cand < 0 else index[cand]
            kept = [index[x] for x in kids if x in index]
            if kept:
                tree.children[node] = kept
            tree.draft_logprobs[node] = self.q[cand]
        return tree


def _tree_depth(tree_cfg: TreeConfig, max_depth: int | None) -> int:
    depth = min(tree_cfg.depth, tree_cfg.budget)  # a node at depth d needs d nodes of the budget
    if max_depth is not None:
        depth = min(depth, max_depth)
    if depth < 1:
        raise PadrecError("build_tree needs a depth of at least 1")
    return depth


def build_tree(
    root_logits: torch.Tensor,
    constraint: ListConstraint,
    cfg: GenerationConfig,
    tree_cfg: TreeConfig,
    propose: ProposeFn,
    max_depth: int | None = None,
    acceptance=None,
) -> DraftTree:
    """Build a draft tree below the last committed token.

    `root_logits` [V]: the draft's next-token logits after the last committed token; `constraint`: the list state
    there (not modified); `propose(parents, tokens, depths)`: the draft session's propose, with tree-local parent
    indices (-1 = root; k = the k-th node proposed in this build); `max_depth`: cap on the depth (the tokens the list
    still needs); `acceptance`: the draft's `AcceptanceModel`, required by a calibrated tree. Calls `propose` once per
    level that is expanded (at most depth - 1 times).
    """
    if tree_cfg.score == "calibrated" and acceptance is None:
        raise PadrecError("a calibrated tree needs the draft's acceptance table: run `padrec calibrate` first")
    floor = math.log(tree_cfg.min_accept) if tree_cfg.min_accept > 0 else -math.inf
    depth, k = _tree_depth(tree_cfg, max_depth), tree_cfg.branching
    cands = _Candidates(constraint, cfg, tree_cfg, acceptance)
    # a node's processing is a handful of tiny ops over at most a codebook of logits: on a GPU, one copy of a
    # level's logits to the host beats a device round trip per node
    host = torch.device("cpu")
    cands.expand(-1, root_logits.to(host), constraint, 0.0, 0)
    proposed: dict[int, int] = {}  # candidate -> index in the draft session's speculative nodes
    level, calls, score = list(range(len(cands))), 0, cands.score
    for d in range(1, depth):
        sel = [c for c in sorted(level, key=lambda c: (-score[c], c))[:k] if score[c] >= floor]
        if floor > -math.inf:  # skip a draft step none of whose children could pass the threshold
            sel = [c for c in sel if score[c] + cands.child_bound(c) >= floor]
        if not sel:
            break
        base_idx = len(proposed)
        for j, c in enumerate(sel):
            proposed[c] = base_idx + j
        parents = [-1 if cands.parent[c] < 0 else proposed[cands.parent[c]] for c in sel]
        logits = propose(parents, [cands.tok[c] for c in sel], [d] * len(sel)).to(host)
        calls += 1
        start = len(cands)
        for j, c in enumerate(sel):
            cands.expand(c, logits[j], cands.cons_of(c), score[c], d)
        level = list(range(start, len(cands)))
    ranked = sorted(range(len(cands)), key=lambda c: (-score[c], cands.depth[c], c))
    keep = [c for c in ranked[: tree_cfg.budget] if score[c] >= floor] or ranked[:1]  # at least one node
    return cands.to_tree(keep, calls)
