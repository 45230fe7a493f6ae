"""Batch-1 latency of top-K beam search: plain constrained beam search vs speculative beam search (AtSpeed).

The baseline is `beam_search_items` - already the fast plain implementation: KV cache, the prompt prefilled once,
all K beams of a level fed in one forward as query tokens of the prompt's single cache row (tree-attention prefix
sharing, AtSpeed's `target_generate`), and no forward at levels where every beam is forced. Speedups are against
that, not against a naive beam search.

Honest measurement (as in `bench.py`): one process, the same target, the same users; the first `warmup` users are
decoded once before the measured pass; then for every user the plain search and every speculative configuration
run back to back, so machine noise hits all of them alike. speedup = median over users of plain time / speculative
time. Strict rows must match plain exactly (`exact` = share of users whose K items come out in the same order;
`max_score_diff` = the largest score difference); relaxed rows are sampled lists, measured by their exact-match rate,
`overlap` (share of plain's K items they contain, far less noisy than Recall on a few hundred users) and
Recall/NDCG@K against the same targets.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.decoding.beam import beam_search_items
from padrec.decoding.trie import ItemTrie
from padrec.metrics import ranking_metrics
from padrec.provenance import device_name
from padrec.run import Run
from padrec.speculative.beam import BeamSpecConfig, speculative_beam_search

BASELINE = ("plain = beam_search_items: constrained beam search with KV cache, prompt prefilled once, beams "
            "sharing it through tree attention, no forward at forced levels")


@dataclass
class BeamBenchConfig:
    users: int = 100  # 0 = every user of the split
    warmup: int = 5
    split: str = "test"
    seed: int = 0
    ks: list[int] = field(default_factory=lambda: [10])
    draft_beams: list[int] = field(default_factory=lambda: [40])  # N; a value below K runs as N = K
    gammas: list[int] = field(default_factory=lambda: [3])
    modes: list[str] = field(default_factory=lambda: ["strict", "relaxed"])
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # relaxed rows, one per temperature
    device: str = "cpu"  # where the target runs (drafts are placed by the caller)


def _configs(cfg: BeamBenchConfig, K: int) -> list[BeamSpecConfig]:
    seen, out = set(), []
    for mode in cfg.modes:
        for t in cfg.temperatures if mode == "relaxed" else [1.0]:
            for n in cfg.draft_beams:
                for g in cfg.gammas:
                    key = (mode, t, max(n, K), g)
                    if key not in seen:
                        seen.add(key)
                        out.append(BeamSpecConfig(beam_size=K, draft_beams=max(n, K), gamma=g, verify=mode,
                                                  temperature=t))
    return out


def run_beam_bench(run: Run, drafts: dict, cfg: BeamBenchConfig, progress: bool = True) -> dict:
    """`drafts`: name -> Draft. One row per (K, decoder): τ (beam levels per target forward), target forwards,
    median latency, speedup vs plain, exact-match rate vs plain, Recall/NDCG@K, draft time share, acceptance
    rate by draft depth."""
    model = run.load_target(cfg.device)
    trie = ItemTrie(run.sids.all_item_tokens())
    cases = run.dataset.eval_cases(cfg.split, max_history=run.info.max_history)
    if not cases:
        raise PadrecError(f"no {cfg.split} users to benchmark")
    if cfg.users > 0:
        cases = random.Random(cfg.seed).sample(cases, min(len(cases), cfg.users))
    if max(cfg.ks) > trie.num_items:
        raise PadrecError(f"K={max(cfg.ks)} exceeds the catalogue's {trie.num_items} items")
    L = trie.levels
    rows = []
    for K in cfg.ks:
        decoders = [("plain", "-", None, lambda p, _K=K: beam_search_items(model, p, trie, _K, _K))]
        for dname, draft in drafts.items():
            for sc in _configs(cfg, K):
                decoders.append((sc.verify, dname, sc,
                                 lambda p, g, d=draft, s=sc: speculative_beam_search(model, d, p, trie, s,
                                                                                      generator=g)))
        results = [[] for _ in decoders]
        times = [[] for _ in decoders]
        with torch.inference_mode():
            for c in cases[: cfg.warmup]:
                p = run.prompt(c.history)
                for i, (_m, _d, _s, fn) in enumerate(decoders):
                    fn(p) if i == 0 else fn(p, torch.Generator().manual_seed(cfg.seed))
            for u, c in enumerate(tqdm(cases, desc=f"beam bench K={K}", disable=not progress, unit="user")):
                p = run.prompt(c.history)
                for i, (_m, _d, _s, fn) in enumerate(decoders):
                    gen = None if i == 0 else torch.Generator().manual_seed(cfg.seed * 1_000_003 + u)
                    t0 = time.perf_counter()
                    res = fn(p) if i == 0 else fn(p, gen)
                    times[i].append(time.perf_counter() - t0)
                    results[i].append(res)
        targets = [c.targets for c in cases]
        plain_t, plain_r = times[0], results[0]
        for i, (mode, dname, sc, _fn) in enumerate(decoders):
            res = results[i]
            same = sum(r.items == b.items for r, b in zip(res, plain_r))
            diffs = [abs(x - y) for r, b in zip(res, plain_r) if r.items == b.items for x, y in zip(r.scores, b.scores)]
            row = {
                "mode": mode, "draft": dname, "K": K,
                "N": sc.draft_beams if sc else None, "gamma": sc.gamma if sc else None,
                "temperature": sc.temperature if sc and mode == "relaxed" else None,
                "tau": statistics.mean(L / max(r.model_calls, 1) for r in res),
                "target_calls": statistics.mean(r.model_calls for r in res),
                "median_ms": 1000 * statistics.median(times[i]),
                "speedup": statistics.median(a / b for a, b in zip(plain_t, times[i])),
                "speedup_of_medians": statistics.median(plain_t) / statistics.median(times[i]),
                "exact": same / len(res), "exact_users": f"{same}/{len(res)}",
                "overlap": statistics.mean(len(set(r.items) & set(b.items)) / max(1, len(b.items))
                                           for r, b in zip(res, plain_r)),
                "max_score_diff": max(diffs, default=0.0),
                **ranking_metrics([r.items for r in res], targets, ks=(K,)),
            }
            if sc is not None:
                row["draft_share"] = statistics.mean(r.stats["draft_time_share"] for r in res)
                depth = [[sum(r.stats["accept_by_depth"][j][x] for r in res) for x in (0, 1)]
                         for j in range(sc.gamma)]
                row["accept_by_depth"] = [acc / att if att else None for att, acc in depth]
                row["resampled_per_user"] = statistics.mean(r.stats["resampled"] for r in res)
            rows.append(row)
    return {"rows": rows, "users": len(cases), "warmup": cfg.warmup, "levels": L, "baseline": BASELINE,
            "tau_definition": "beam levels (L, forced ones included) per target forward, mean over users",
            "speedup_definition": "median over users of (plain time / speculative time), same user back to back",
            "threads": torch.get_num_threads(), "device": device_name(cfg.device)}


def display_beam_rows(rows: list[dict]) -> list[dict]:
    def r(x, nd):
        return "-" if x is None else round(x, nd)

    out = []
    for row in rows:
        K = row["K"]
        acc = row.get("accept_by_depth")
        out.append({
            "mode": row["mode"] + ("" if row.get("temperature") is None else f" T={row['temperature']:g}"),
            "draft": row["draft"], "K": K, "N": r(row["N"], 0), "γ": r(row["gamma"], 0),
            "τ": r(row["tau"], 2), "calls": r(row["target_calls"], 2), "ms": r(row["median_ms"], 1),
            "speedup": r(row["speedup"], 2), "exact": row["exact_users"], "overlap": r(row["overlap"], 3),
            "draft%": r(None if "draft_share" not in row else 100 * row["draft_share"], 0),
            "R@K": r(row[f"recall@{K}"], 4), "N@K": r(row[f"ndcg@{K}"], 4),
            "acc/depth": "-" if not acc else " ".join("-" if a is None else f"{a:.2f}" for a in acc),
        })
    return out
