"""Speculative beam search for the top-K next items (AtSpeed): `speculative_beam_search`.

An item is L SID tokens, so beam search has exactly L steps ("levels"; the separator after an item is never part of
it). Plain constrained beam search (`padrec.decoding.beam.beam_search_items`) pays one target forward per level
that has a real decision. A round here:

  1. draft: from the current K target beams (with their *target* scores, the best prior the draft can get), the
     draft runs g = min(gamma, L - 1 - level) levels of width-N beam search under the same trie constraint.
     Selection is nested: the first K of each drafted level are the draft's own top-K expansion of the first K of
     the level above (its simulation of the target's beam), the other N - K are the best remaining expansions of
     all N. With plain top-N selection a perfect draft can still miss the target's beam (a hedge node with two
     likely children outranks the target's K-th choice), so "draft = target accepts every level" would not hold.
     Trailing drafted levels whose nodes all have a single allowed child are dropped: their logits are never needed.
  2. verify: ONE target forward over the beams' unfed tokens and every drafted node, with tree attention
     (`TargetBeamTree.feed`; positions = prompt length + depth - 1, as in plain beam search).
  3. walk (strict): level by level the target's own top-K expansion is computed exactly as plain beam search does
     (`expansion_scores` + `select_top_k`, the shared tie-break `beam_rank_key`, forced levels cost no logits);
     it continues while every non-forced beam of the new level is a drafted node (so its logits came with the
     forward). The level where that fails is still computed (the target's "bonus" step) - its beams become the
     next round's unfed tokens. So each round commits accepted levels + 1, and the beams after the last level are
     exactly plain beam search's: the draft only decides *how many* levels one forward can certify.

Why equal to plain beam search: by induction the walk's beams at each level are plain beam search's beams, because
they are computed from the same constrained log-probabilities of the same beams with the same ranking; tree attention
gives each node exactly the logits of prompt + its own path (tests/test_speculative.py checks that it equals a
plain forward). The only difference is floating point: the forwards have other shapes than plain beam search's,
so float32 logits can differ in the last bits and a near-exact score tie could flip (float64 in the tests).

Relaxed verification (`cfg.verify = "relaxed"`, AtSpeed-R, NOT lossless) lives in `beam_relaxed.py`.

Forced levels: a level at which every beam has a single allowed child is taken without logits, by draft and target.
A feature-level draft (EAGLE family) needs the target's features of the prompt before it can say anything, so its
first target forward is the prompt alone (it yields level 0 exactly); independent drafts draft from the root and
the prompt is verified together with the first tree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import check_prompt
from padrec.decoding.beam import exclusion_constraint, beam_rank_key, beam_search_items, expansion_scores, select_top_k
from padrec.decoding.trie import ItemTrie, ListConstraint
from padrec.drafts.base import Draft
from padrec.speculative.beam_relaxed import draft_levels_relaxed, walk_relaxed
from padrec.speculative.beam_state import Beam, DraftBeamTree, Prefix, TargetBeamTree
from padrec.speculative.decoder import check_draft

__all__ = ["Beam", "BeamSpecConfig", "SpecBeamResult", "speculative_beam_search"]

VERIFY_MODES = ("strict", "relaxed")
DEFAULT_GAMMA = 3


@dataclass(frozen=True)
class BeamSpecConfig:
    beam_size: int = 10  # K: the target's beam width and the length of the returned list
    draft_beams: int = 40  # N >= K: nodes the draft keeps per level
    gamma: int = 3  # drafted levels per round
    verify: str = "strict"
    temperature: float = 1.0  # relaxed only: p and q are softmax(sequence score / temperature)
    trace: bool = False  # keep per-round records in SpecBeamResult.trace

    @classmethod
    def for_beam_width(cls, k: int, draft_beams: int | None = None, gamma: int | None = None,
                       verify: str = "strict") -> "BeamSpecConfig":
        """The settings to serve top-`k` with: N = max(2K, 40) drafted nodes per level and γ = 3 levels per round
        were the fastest strict ones at K = 10 and 20 on zoo:beauty on this project's 2-core CPU (README,
        "Speculative beam search"; benchmarks/results/zoo_beauty_beam.json)."""
        return cls(beam_size=k, draft_beams=max(2 * k, 40) if draft_beams is None else draft_beams,
                   gamma=DEFAULT_GAMMA if gamma is None else gamma, verify=verify)

    def __post_init__(self):
        if not self.temperature > 0:
            raise PadrecError(f"temperature must be > 0, got {self.temperature}")
        if self.beam_size < 1 or self.draft_beams < self.beam_size:
            raise PadrecError(f"need 1 <= K <= N, got K={self.beam_size}, N={self.draft_beams}")
        if self.gamma < 1:
            raise PadrecError(f"gamma must be >= 1, got {self.gamma}")
        if self.verify not in VERIFY_MODES:
            raise PadrecError(f"unknown verification {self.verify!r}: expected one of {VERIFY_MODES}")


@dataclass
class SpecBeamResult:
    items: list[int]  # best first, like BeamResult.items
    scores: list[float]  # target scores (summed constrained log-probabilities)
    target_calls: int
    draft_calls: int
    stats: dict
    trace: list[dict] | None = None

    @property
    def model_calls(self) -> int:  # BeamResult-compatible name
        return self.target_calls


class _Search:
    """State shared by the draft and the walks of one request."""

    def __init__(self, trie: ItemTrie, cons: ListConstraint, cfg: BeamSpecConfig, target: TargetBeamTree,
                 draft: DraftBeamTree, vocab: int, generator):
        self.trie, self.cons, self.cfg = trie, cons, cfg
        self.target, self.draft = target, draft
        self.vocab = vocab
        self.generator = generator
        # Set when the target's own top-K choice at some level is within float rounding of flipping (see
        # `near_tie_tolerance`): the speculative forwards score the same nodes with other shapes than plain beam
        # search, so only plain beam search itself can say which way such a tie goes.
        self.near_tie = False
        self.tie_tol = 0.0  # set by speculative_beam_search from the target's dtype

    def allowed(self, beams: Sequence[Beam]):
        return [self.cons.children_allowed(b.node) for b in beams]

    def child(self, beam: Beam, score: float, tok: int) -> Beam:
        return Beam(score, beam.seq + (tok,), self.trie.child_of[beam.node][tok])

    def forced_step(self, beams, allowed) -> list[Beam]:
        return [self.child(b, b.score, a[0][0]) for b, a in zip(beams, allowed)]

    def rows(self, beams, allowed, table) -> torch.Tensor | None:
        """Logits rows of the beams from `table` (prefix -> row); a forced beam may lack one (any finite row gives
        its single child log-probability 0). None when a beam with a real decision has no row."""
        out = [table.get(b.seq) for b in beams]
        if any(r is None and len(a[0]) > 1 for r, a in zip(out, allowed)):
            return None
        ref = next(r for r in out if r is not None)
        return torch.stack([torch.zeros_like(ref) if r is None else r for r in out])

    def expand(self, beams, rows, allowed) -> torch.Tensor:
        return expansion_scores(rows, [a[1] for a in allowed], [b.score for b in beams])

    def picked_beams(self, beams, picked) -> list[Beam]:
        return [self.child(beams[b], score, tok) for score, _seq, b, tok in picked]

    # -- strict ---------------------------------------------------------------------------------------------------
    def draft_levels_strict(self, beams: list[Beam], g: int) -> list[list[Beam]]:
        K, N, V = self.cfg.beam_size, self.cfg.draft_beams, self.vocab
        levels, frontier = [], beams
        for _ in range(g):
            allowed = self.allowed(frontier)
            if all(len(a[0]) == 1 for a in allowed):
                frontier = self.forced_step(frontier, allowed)
            else:
                need = [b.seq for b, a in zip(frontier, allowed) if len(a[0]) > 1]
                got = dict(zip(need, self.draft.logits_at(need)))
                cand = self.expand(frontier, self.rows(frontier, allowed, got), allowed)
                prefixes = [b.seq for b in frontier]
                kp = min(K, len(frontier))
                primary = select_top_k(cand[: kp * V], prefixes[:kp], V, K)
                rest = cand.clone()
                rest[[b * V + tok for _s, _q, b, tok in primary]] = float("-inf")
                hedge = select_top_k(rest, prefixes, V, N - len(primary))
                frontier = self.picked_beams(frontier, primary + hedge)
            levels.append(frontier)
        return levels

    def walk_strict(self, beams: list[Beam], level: int, reached: dict) -> tuple[list[Beam], int]:
        """Plain beam search's steps, as far as the target logits at hand allow. Records each level's beams."""
        L, K = self.trie.levels, self.cfg.beam_size
        while level < L:
            allowed = self.allowed(beams)
            if all(len(a[0]) == 1 for a in allowed):
                beams = self.forced_step(beams, allowed)
            else:
                rows = self.rows(beams, allowed, self.target.logits)
                if rows is None:
                    break
                cands = self.expand(beams, rows, allowed)
                self.near_tie = self.near_tie or _near_tie(cands, K, self.tie_tol)
                picked = select_top_k(cands, [b.seq for b in beams], self.vocab, K)
                beams = self.picked_beams(beams, picked)
            level += 1
            reached[level] = beams
        return beams, level


def near_tie_tolerance(model) -> float:
    """Largest score difference that rounding can flip between two forwards of different shapes: float32 logits
    of the same prefix differ by ~1e-6 between a batched tree forward and plain beam search's (observed gaps of
    flipped pairs: 4e-7 to 6.6e-6), half precision by far more."""
    dtype = next(model.parameters()).dtype
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)


def _near_tie(cands: torch.Tensor, k: int, tol: float) -> bool:
    """Whether the order of the best k candidates, or the boundary between the k-th and the next, rests on a score
    gap below `tol`."""
    n = min(k + 1, int(torch.isfinite(cands).sum()))
    if n < 2:
        return False
    top = torch.topk(cands, n).values
    return bool(((top[:-1] - top[1:]) < tol).any())


def _drop_forced_tail(search: _Search, levels: list[list[Beam]]) -> list[list[Beam]]:
    while levels and all(len(a[0]) == 1 for a in search.allowed(levels[-1])):
        levels = levels[:-1]
    return levels


def _unfed(target: TargetBeamTree, beams: Sequence[Beam]) -> list[Prefix]:
    need = {p for b in beams for p in (b.seq[:i] for i in range(1, len(b.seq) + 1)) if p not in target.col}
    return sorted(need, key=lambda p: (len(p), p))


def _free_walk(search: _Search, beams, level: int, strict: bool):
    """Walk as far as the logits at hand allow, with no drafted levels."""
    if strict:
        return search.walk_strict(beams, level, {})
    return walk_relaxed(search, beams, level, {}, None)[:2]


def _start(search: _Search, prompt: list[int], strict: bool, features: bool) -> tuple[list[Beam], int, float]:
    """Walk the levels forced from the root (no model), feed the prompt to the target where a feature draft
    (`features`) needs its states, and commit the prompt to the draft. Returns (beams, level, draft seconds)."""
    tt, dt, L = search.target, search.draft, search.trie.levels
    beams, level = _free_walk(search, [Beam(0.0, (), 0)], 0, strict)
    if level >= L:
        return beams, level, 0.0
    feats = None
    if features:
        hidden = tt.feed(prompt, _unfed(tt, beams))
        beams, level = _free_walk(search, beams, level, strict)
        tt.trim([b.seq for b in beams])
        if level >= L:
            return beams, level, 0.0
        feats = torch.zeros_like(hidden[: len(prompt)])
        feats[1:] = hidden[: len(prompt) - 1]
    t0 = time.perf_counter()
    dt.commit_prompt(prompt, feats)
    return beams, level, time.perf_counter() - t0


def _accepted_levels(levels, reached: dict, start: int, by_depth: list[list[int]]) -> int:
    """Drafted levels the walk confirmed (each reached level's beams among the drafted ones), counted by depth."""
    acc = 0
    for d, drafted in enumerate(levels):
        got = reached.get(start + d + 1)
        if got is None:
            break
        by_depth[d][0] += 1
        if not {b.seq for b in got} <= {b.seq for b in drafted}:
            break
        by_depth[d][1] += 1
        acc += 1
    return acc


def _round(search: _Search, prompt: list[int], beams, level: int, strict: bool):
    """One round: draft up to gamma levels, feed them to the target in one forward, walk. Returns (beams, level,
    drafted levels, the levels reached, resampled count, draft seconds)."""
    tt, cfg, L = search.target, search.cfg, search.trie.levels
    t0 = time.perf_counter()
    g = min(cfg.gamma, L - 1 - level)
    if strict:
        levels, qs = search.draft_levels_strict(beams, g), None
    else:
        levels, qs = draft_levels_relaxed(search, beams, g)
    levels = _drop_forced_tail(search, levels)
    draft_s = time.perf_counter() - t0
    nodes = _unfed(tt, beams) + [b.seq for lv in levels for b in lv]
    if not tt.n_prompt:
        tt.feed(prompt, nodes)
    elif nodes:  # empty only after a relaxed round that ended on fed beams, with nothing left to draft
        tt.feed(None, nodes)
    start, reached, n_res = level, {}, 0
    if strict:
        beams, level = search.walk_strict(beams, level, reached)
    else:
        beams, level, n_res = walk_relaxed(search, beams, level, reached, (levels, qs))
    if level == start:  # every round commits a level (its forward holds the beams' logits); guard it
        raise PadrecError(f"internal error: a speculative beam round made no progress at level {level}")
    tt.trim([b.seq for b in beams])
    return beams, level, levels, reached, n_res, draft_s


def speculative_beam_search(
    target,
    draft: Draft,
    prompt_tokens: Sequence[int],
    trie: ItemTrie,
    cfg: BeamSpecConfig | None = None,
    exclude_items: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> SpecBeamResult:
    """Top-`cfg.beam_size` next items of one prompt. Strict verification returns exactly
    `beam_search_items(target, prompt, trie, K, K, exclude_items)` (items, order and scores) for any draft; when
    one of the target's choices is a near-tie at float precision, that answer is plain beam search's own."""
    cfg = BeamSpecConfig() if cfg is None else cfg
    t_start = time.perf_counter()
    prompt = check_prompt(prompt_tokens)
    check_draft(target, draft)
    strict = cfg.verify == "strict"
    tt, dt = TargetBeamTree(target), DraftBeamTree(draft)
    search = _Search(trie, exclusion_constraint(trie, exclude_items), cfg, tt, dt, draft.vocab_size, generator)
    search.tie_tol = near_tie_tolerance(target)
    by_depth = [[0, 0] for _ in range(cfg.gamma)]
    accepted_per_round: list[int] = []
    trace: list[dict] | None = [] if cfg.trace else None
    resampled = 0
    with torch.inference_mode():
        beams, level, draft_time = _start(search, prompt, strict, bool(draft.uses_target_features))
        while level < trie.levels:
            start = level
            beams, level, levels, reached, n_res, draft_s = _round(search, prompt, beams, level, strict)
            resampled, draft_time = resampled + n_res, draft_time + draft_s
            accepted_per_round.append(_accepted_levels(levels, reached, start, by_depth))
            if trace is not None:
                trace.append(dict(start=start, end=level, drafted=[[b.seq for b in lv] for lv in levels],
                                  accepted=accepted_per_round[-1],
                                  reached={k: [b.seq for b in v] for k, v in reached.items()}))
    if not strict:  # sampled beams come in acceptance order: rank them like every beam search
        beams = sorted(beams, key=lambda b: beam_rank_key(b.score, b.seq))
    plain = None
    if strict and search.near_tie:  # rare (float32: ~1e-4 score gaps); keeps "strict == plain" exact
        plain = beam_search_items(target, prompt, trie, cfg.beam_size, cfg.beam_size, exclude_items)
    elapsed = time.perf_counter() - t_start
    rounds = len(accepted_per_round)
    stats = dict(rounds=rounds, tau=trie.levels / max(tt.forwards, 1),
                 mean_accepted=sum(accepted_per_round) / max(rounds, 1), accept_by_depth=by_depth,
                 target_forwards=tt.forwards, draft_forwards=dt.calls, draft_time_s=draft_time, total_time_s=elapsed,
                 draft_time_share=draft_time / elapsed if elapsed > 0 else 0.0, resampled=resampled,
                 near_tie_fallback=bool(plain is not None and plain.model_calls))
    if plain is not None and plain.model_calls:
        return SpecBeamResult(items=list(plain.items), scores=list(plain.scores),
                              target_calls=tt.forwards + plain.model_calls, draft_calls=dt.calls, stats=stats,
                              trace=trace)
    top = beams[: cfg.beam_size]
    return SpecBeamResult(items=[trie.leaf_item[b.node] for b in top], scores=[b.score for b in top],
                          target_calls=tt.forwards, draft_calls=dt.calls, stats=stats, trace=trace)
