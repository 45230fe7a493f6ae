"""Acceptance calibration: how likely the target takes the draft's r-th candidate, by item slot and draft margin.

EAGLE-2 grows and prunes its tree by the draft's cumulative probability, on the assumption that the draft's
confidence tracks acceptance. In a recommender it does not: the next *item* is genuinely uncertain, so at an
item's first slot the draft's top token has probability ~0.05 while greedy verification accepts it ~80% of the
time (the target takes the arg-max of an equally flat distribution, and the two arg-maxes agree). A tree scored by
draft probability therefore spends its budget on second-choice items near the root and stays shallow, and loses to
a plain chain.

What does predict acceptance is the item slot and the draft's *margin* (log-prob of its best candidate minus its
second best): on the deep Beauty target, slot-0 acceptance of the top candidate rises from 0.60 to 0.97 across the
margin quartiles, and the second candidate takes most of the rest. `AcceptanceModel` is that table:
P(target's choice = the draft's rank-r candidate | slot, margin bucket), fitted on validation users by running
chain speculation and recording, at every node the verification walked through, the rank the target's choice had
in the draft's ordering. With `TreeConfig(score="calibrated")`, `build_tree` scores a candidate by the log of that
probability instead of its draft log-prob, so a node's cumulative score estimates the chance that the target
accepts its whole path and the kept budget maximises the expected accepted length (under independence of nodes).

Only the tree's *shape* changes: the tokens proposed at a node are still the draft's top-k in the draft's order,
and verification is untouched, so every lossless guarantee holds whatever the table says. The table is fitted for
greedy decoding; with sampling it is merely a heuristic shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from padrec import PadrecError
from padrec.decoding.autoregressive import GenerationConfig
from padrec.decoding.trie import ItemTrie
from padrec.drafts.acceptance import ACCEPTANCE_FILE, RANKS, AcceptanceModel
from padrec.drafts.registry import WEIGHTS, draft_dir, load_acceptance, read_draft_meta
from padrec.speculative.decoder import SpecConfig, speculative_generate
from padrec.speculative.tree import TreeConfig, proposal_order

__all__ = ["ACCEPTANCE_FILE", "AcceptanceModel", "calibrate_draft", "collect_acceptance_samples", "fit_acceptance",
           "load_acceptance"]

def calibrate_draft(run, name: str, draft, target, users: int = 60, depth: int = 8, n_items: int = 10,
                    split: str = "valid", seed: int = 0, progress: bool = True) -> AcceptanceModel:
    """Fit the acceptance table of a run's draft on `users` users of `split` (greedy lists of `n_items`), save it
    as DIR/drafts/NAME/acceptance.json and attach it to `draft`."""
    import random


    cases = run.dataset.eval_cases(split, max_history=run.info.max_history)
    if not cases:
        raise PadrecError(f"no {split} users to calibrate on")
    cases = random.Random(seed).sample(cases, min(users, len(cases)))
    trie = ItemTrie(run.sids.all_item_tokens())
    samples = collect_acceptance_samples(target, draft, [run.prompt(c.history) for c in cases], trie,
                                         GenerationConfig(n_items=n_items), depth=depth, progress=progress)
    path = draft_dir(run, name)
    meta = read_draft_meta(path)
    model = fit_acceptance(samples, trie.levels, weights_sha256=meta.get("files", {}).get(WEIGHTS, ""))
    model.save(path / ACCEPTANCE_FILE)
    draft.acceptance = model
    return model


def collect_acceptance_samples(target, draft, prompts: Iterable[Sequence[int]], trie, cfg, depth: int = 8,
                               progress: bool = False) -> list[tuple[int, float, int]]:
    """(slot, draft margin, rank of the target's choice in the draft's order) at every non-forced node that chain
    speculation of `depth` walked through while decoding `prompts` greedily."""
    from tqdm.auto import tqdm


    if cfg.do_sample:
        raise PadrecError("acceptance is calibrated for greedy decoding")
    spec = SpecConfig(tree=TreeConfig.chain(depth), trace=True)
    out = []
    prompts = list(prompts)
    for prompt in tqdm(prompts, desc="calibrating acceptance", unit="user", disable=not progress):
        res = speculative_generate(target, draft, prompt, trie, cfg, spec)
        for rnd in res.trace:
            tree, start = rnd["tree"], rnd["start"]
            for i, node in enumerate([-1] + rnd["path"]):  # the nodes verification decided at
                pos = start + i
                if pos >= len(res.tokens) or node not in tree.draft_logprobs:
                    break
                toks, lp = tree.draft_logprobs[node]
                if len(toks) < 2:
                    continue
                vals = lp.tolist()
                order = proposal_order(vals)
                rank = [toks[j] for j in order].index(res.tokens[pos])
                out.append((tree.constraint_at(node).position, vals[order[0]] - vals[order[1]], rank))
    return out


def fit_acceptance(samples: list[tuple[int, float, int]], levels: int, buckets: int = 4, min_per_bucket: int = 40,
                   weights_sha256: str = "") -> AcceptanceModel:
    """Bucket each slot's margins at quantiles (fewer buckets when samples are few) and estimate the rank
    distribution per bucket, with add-half smoothing."""
    edges, probs, counts = [], [], []
    for s in range(levels):
        ms = sorted(m for slot, m, _ in samples if slot == s and math.isfinite(m))
        rows = [(m, r) for slot, m, r in samples if slot == s]
        nb = max(1, min(buckets, len(ms) // max(min_per_bucket, 1)))
        cuts = sorted({ms[len(ms) * q // nb] for q in range(1, nb)}) if ms else []
        hist = [[0.5] * RANKS + [0.5] for _ in range(len(cuts) + 1)]  # + one cell for deeper ranks
        for m, r in rows:
            hist[sum(m > c for c in cuts)][min(r, RANKS)] += 1
        edges.append(cuts)
        probs.append([[x / sum(h) for x in h[:RANKS]] for h in hist])
        counts.append(len(rows))
    return AcceptanceModel(levels=levels, edges=edges, probs=probs, samples=counts, weights_sha256=weights_sha256)

