"""Strict speculative beam search vs plain constrained beam search on every user of a split (no timing).

    .venv/bin/python benchmarks/spec_beam_equality.py --run runs/quality/beauty --drafts lm,eagle
        [--k 10] [--n 20] [--gamma 3] [--start 0] [--end N] [--threads 1] [--out FILE.json]

For each user in [start, end) of the split (dataset order) it runs `beam_search_items(target, prompt, trie, K, K)`
and `speculative_beam_search` with each draft, and counts users whose K items differ (in order) and the largest
score difference. Models run in float32 as trained, so a mismatch is either a near-tie flipped by the different
forward shapes (the same items, neighbours swapped, plain scores a few 1e-6 apart - the cache-free
`beam_search_reference` flips them too) or a bug; each mismatch is listed with what differs. Slices let a long
split run in pieces.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from tqdm.auto import tqdm

from padrec.decoding.beam import beam_search_items
from padrec.decoding.trie import ItemTrie
from padrec.drafts.registry import load_draft
from padrec.run import Run
from padrec.speculative.beam import BeamSpecConfig, speculative_beam_search


def _mismatch(user, ref, res, recheck) -> dict:
    """What differs, and whether both searches agree when rerun in float64 (`recheck`): then the float32 mismatch
    was a near-tie (at the final ranking, or at an intermediate level's K-th beam, which changes the item set)."""
    pos = {item: i for i, item in enumerate(ref.items)}
    same_set = set(res.items) == set(ref.items)
    gap = max((abs(ref.scores[pos[item]] - ref.scores[i]) for i, item in enumerate(res.items)
               if item in pos and pos[item] != i), default=float("inf"))
    return {"user": user, "same_set": same_set, "max_swapped_score_gap": gap if same_set else None,
            "float64_agree": recheck(), "plain": list(zip(ref.items, ref.scores)),
            "speculative": list(zip(res.items, res.scores))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--drafts", default="lm")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--end", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--users", default=None, help="only these user ids (comma-separated), e.g. earlier mismatches")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Run(a.run)
    model = run.load_target()
    trie = ItemTrie(run.sids.all_item_tokens())
    cases = run.dataset.eval_cases(a.split, max_history=run.info.max_history)
    cases = cases[a.start : a.end]
    if a.users:
        wanted = {u.strip() for u in a.users.split(",")}
        cases = [c for c in cases if str(c.user) in wanted]
    drafts = {name: load_draft(run, name) for name in a.drafts.split(",") if name}
    cfg = BeamSpecConfig(beam_size=a.k, draft_beams=max(a.n, a.k), gamma=a.gamma)
    stats = {name: {"users": 0, "mismatches": [], "details": [], "max_score_diff": 0.0, "target_calls": 0,
                    "near_tie_fallbacks": 0}
             for name in drafts}
    plain_calls = 0
    doubles = {}

    def f64(name, prompt) -> bool:
        if name not in doubles:
            draft = copy.deepcopy(drafts[name])
            draft.model = draft.model.double()
            doubles[name] = (copy.deepcopy(model).double(), draft)
        m64, d64 = doubles[name]
        ref64 = beam_search_items(m64, prompt, trie, a.k, a.k)
        return ref64.items == speculative_beam_search(m64, d64, prompt, trie, cfg).items
    t0 = time.time()
    with torch.inference_mode():
        for c in tqdm(cases, desc=f"{run.info.dataset} [{a.start}:{a.end}]", unit="user", mininterval=10):
            prompt = run.prompt(c.history)
            ref = beam_search_items(model, prompt, trie, a.k, a.k)
            plain_calls += ref.model_calls
            for name, draft in drafts.items():
                res = speculative_beam_search(model, draft, prompt, trie, cfg)
                s = stats[name]
                s["users"] += 1
                s["target_calls"] += res.target_calls
                s["near_tie_fallbacks"] += int(res.stats.get("near_tie_fallback", False))
                if res.items != ref.items:
                    s["mismatches"].append(c.user)
                    s["details"].append(_mismatch(c.user, ref, res, lambda: f64(name, prompt)))
                else:
                    diff = max((abs(x - y) for x, y in zip(res.scores, ref.scores)), default=0.0)
                    s["max_score_diff"] = max(s["max_score_diff"], diff)
    out = {"run": str(run.path), "dataset": run.info.dataset, "split": a.split, "start": a.start,
           "end": a.start + len(cases), "K": a.k, "N": cfg.draft_beams, "gamma": a.gamma,
           "plain_calls_per_user": plain_calls / max(1, len(cases)), "seconds": time.time() - t0,
           "threads": torch.get_num_threads(),
           "drafts": {k: {**v, "exact": v["users"] - len(v["mismatches"]),
                          "target_calls_per_user": v["target_calls"] / max(1, v["users"])} for k, v in stats.items()}}
    for name, s in out["drafts"].items():
        print(f"{out['dataset']} users [{out['start']}, {out['end']}) draft {name}: exact {s['exact']}/{s['users']}, "
              f"max score diff {s['max_score_diff']:.2e}, target calls/user {s['target_calls_per_user']:.2f} "
              f"(plain {out['plain_calls_per_user']:.2f}), near-tie fallbacks {s['near_tie_fallbacks']}")
        for m in s["details"]:
            print(f"  user {m['user']}: same item set {m['same_set']}, largest plain-score gap between swapped "
                  f"items {m['max_swapped_score_gap']}, equal in float64: {m['float64_agree']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(not s["mismatches"] for s in stats.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
