"""Relaxed sampling verification for speculative beam search (AtSpeed-R). NOT lossless.

Draft: at each drafted level the draft samples N distinct expansions without replacement from
q(b, t) ∝ exp((S(b) + log q_draft(t | b)) / T) over all expansions of its frontier (S: the target's score for the
current beams, the draft's cumulative score below them; T = `cfg.temperature`).

Walk, per level, with p(b, t) ∝ exp((S_T(b) + log p_target(t | b)) / T) over the expansions of the current target
beams (the same constrained scores strict verification ranks):
  * each drafted node y whose parent is a current beam is accepted with probability min(1, p(y) / q(y)), where
    q(y) is the draft's probability of y at that level (0 when the draft never had y's parent: always accepted);
  * >= K accepted: K of them, uniformly at random (kept in draft order), become the beams; next level;
  * fewer: the missing ones are drawn without replacement from the residual max(0, p - q) with the accepted zeroed
    (from p itself for whatever the residual cannot supply), and the round ends;
  * past the last drafted level: K expansions drawn from p without replacement (the bonus), and the round ends.
Levels at which every beam has one allowed child are taken deterministically, as in strict mode. The final K beams
are ranked by their target scores. Sequence-level p/q tests do not make K draws without replacement from p, and
the result is not beam search either, so the output is measured (Recall/NDCG, exact-match rate against plain beam
search), never asserted equal. With a flat target (a small model over thousands of items) T = 1 samples mostly from
the long tail: the bench measures what a lower T buys back.
"""

from __future__ import annotations

import torch

from padrec.speculative.beam_state import Beam

__all__ = ["draft_levels_relaxed", "walk_relaxed"]


def _sample(logits: torch.Tensor, n: int, generator, exclude=()) -> list[int]:
    """n draws without replacement from softmax(logits) (fewer if fewer finite entries), by Gumbel top-k: the same
    law as drawing one at a time and renormalising, without underflow at low temperature."""
    u = torch.rand(tuple(logits.shape), generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    keys = logits.detach().to("cpu", torch.float64) - torch.log(-torch.log(u))  # u is on the CPU generator's device
    if len(exclude):
        keys[list(exclude)] = float("-inf")
    n = min(n, int(torch.isfinite(keys).sum()))
    if n <= 0:
        return []
    return keys.topk(n).indices.tolist()


def draft_levels_relaxed(search, beams: list[Beam], g: int):
    """Drafted levels (lists of Beam) and, per level, (frontier prefix -> row, q over the frontier's flat
    expansions [rows * V]) or None for a forced level."""
    N, V = search.cfg.draft_beams, search.vocab
    levels, qs, frontier = [], [], beams
    for _ in range(g):
        allowed = search.allowed(frontier)
        if all(len(a[0]) == 1 for a in allowed):
            nxt, q_info = search.forced_step(frontier, allowed), None
        else:
            need = [b.seq for b, a in zip(frontier, allowed) if len(a[0]) > 1]
            got = dict(zip(need, search.draft.logits_at(need)))
            cand = search.expand(frontier, search.rows(frontier, allowed, got), allowed)
            scaled = cand / search.cfg.temperature
            q = torch.softmax(scaled, 0)
            flat = _sample(scaled, N, search.generator)
            nxt = [search.child(frontier[f // V], float(cand[f]), f % V) for f in flat]
            q_info = ({b.seq: r for r, b in enumerate(frontier)}, q)
        levels.append(nxt)
        qs.append(q_info)
        frontier = nxt
    return levels, qs


def walk_relaxed(search, beams: list[Beam], level: int, reached: dict, drafted=None):
    """Returns (beams, level, number of resampled beams)."""
    L, K, V = search.trie.levels, search.cfg.beam_size, search.vocab
    gen = search.generator
    levels, qs = drafted if drafted is not None else ([], [])
    start = level
    while level < L:
        allowed = search.allowed(beams)
        if all(len(a[0]) == 1 for a in allowed):
            beams = search.forced_step(beams, allowed)
            level += 1
            reached[level] = beams
            continue
        rows = search.rows(beams, allowed, search.target.logits)
        if rows is None:
            break
        cand = search.expand(beams, rows, allowed)
        scaled = cand / search.cfg.temperature
        p = torch.softmax(scaled, 0)
        d = level - start
        resampled = 0
        if d < len(levels) and qs[d] is not None:
            row_of, q = qs[d]
            q_t = torch.zeros_like(p)
            for i, b in enumerate(beams):
                r = row_of.get(b.seq)
                if r is not None:
                    q_t[i * V : (i + 1) * V] = q[r * V : (r + 1) * V]
            parent = {b.seq: i for i, b in enumerate(beams)}
            accepted = []
            for node in levels[d]:
                i = parent.get(node.seq[:-1])
                if i is None:
                    continue
                f = i * V + node.seq[-1]
                pf, qf = float(p[f]), float(q_t[f])
                if pf <= 0.0:
                    continue
                u = float(torch.rand((), generator=gen, dtype=torch.float64))
                if u * qf <= pf:
                    accepted.append(f)
            if len(accepted) >= K:
                keep = torch.randperm(len(accepted), generator=gen)[:K].sort().values.tolist()
                beams = [search.child(beams[accepted[j] // V], float(cand[accepted[j]]), accepted[j] % V)
                         for j in keep]
                level += 1
                reached[level] = beams
                continue
            extra = _sample((p - q_t).clamp_(min=0.0).log(), K - len(accepted), gen, accepted)
            # an exhausted residual: the rest from p itself, so the list still gets K items
            extra += _sample(scaled, K - len(accepted) - len(extra), gen, accepted + extra)
            chosen, resampled = accepted + extra, len(extra)
        else:
            chosen = _sample(scaled, K, gen)
        beams = [search.child(beams[f // V], float(cand[f]), f % V) for f in chosen]
        level += 1
        reached[level] = beams
        return beams, level, resampled
    return beams, level, 0
