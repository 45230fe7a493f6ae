"""Batch-1 latency of list-wise generation: our autoregressive decoder vs speculative configurations.

Honest measurement (DESIGN §4): same target, same process, same users; warm-up first; every user is decoded by
every decoder back to back (pair by pair), so machine noise hits all decoders alike; speedup = median over users
of AR time / SD time, with the ratio of medians beside it, and τ (committed tokens per target forward).

Rows: `ar` is our best autoregressive decoder (the reference every speedup is measured against: KV cache, no call
for forced tokens, the target on the fused path when it is a Llama); `ar-hf` the same decoder with the target run
by Hugging Face modules; `ar-naive` a Hugging Face call for every token; `hf-generate` Hugging Face `generate` with
the same constraint; the peers a user would try first for speed, Hugging Face's own speculative decoders under the
same constraint: `hf-assisted` (assisted generation, each independent-LM draft as `assistant_model`) and
`hf-prompt-lookupN` (prompt-lookup decoding, N tokens copied from the prompt per round).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.decoding.autoregressive import (
    GenerationConfig,
    generate_list,
    generate_list_reference,
    make_constraint,
)
from padrec.decoding.trie import ItemTrie
from padrec.evaluation.bench_rows import SPECULATIVE
from padrec.metrics import ranking_metrics
from padrec.files import atomic_write_text
from padrec.models.fast_target import use_fast_target
from padrec.provenance import device_name, machine_description
from padrec.run import Run
from padrec.speculative.decoder import SpecConfig, speculative_generate
from padrec.speculative.tree import TreeConfig
from padrec.ui import pyplot, save_figure


@dataclass
class BenchConfig:
    users: int = 100
    warmup: int = 5
    n_items: int = 10
    split: str = "test"
    seed: int = 0
    trees: list[TreeConfig] = field(default_factory=lambda: [TreeConfig.chain(4), TreeConfig()])
    naive_ar: bool = True  # also time the reference AR decoder (a model call for every token, forced or not)
    hf_generate: bool = True  # also time HF `generate` with the same constraint
    # peers a user would try first: HF assisted generation with each independent-LM draft as the assistant, and
    # HF prompt-lookup decoding with this many tokens looked up (0: off); both greedy, with the same constraint
    hf_assisted: bool = True
    prompt_lookup: int = 10
    device: str = "cpu"  # where the target runs (drafts are placed by the caller)


def hf_generate_list(model, prompt: list[int], trie: ItemTrie, cfg: GenerationConfig, history=None) -> list[int]:
    """Greedy constrained generation through Hugging Face `generate` (a second reference): the constraint is
    replayed from the prompt at each step through `prefix_allowed_tokens_fn`."""
    n_prompt = len(prompt)
    total = cfg.n_items * (trie.levels + 1)
    state = {"cons": make_constraint(trie, prompt, cfg, history), "fed": 0}

    def allowed(_batch_id, input_ids):
        gen = input_ids[n_prompt:].tolist()
        cons = state["cons"]
        for tok in gen[state["fed"]:]:
            cons.advance(tok)
        state["fed"] = len(gen)
        return list(cons.allowed()) if len(gen) < total else [0]

    dev = model.device
    out = model.generate(torch.tensor([prompt], device=dev),
                         attention_mask=torch.ones(1, n_prompt, dtype=torch.long, device=dev),
                         max_new_tokens=total, min_new_tokens=total, do_sample=False, num_beams=1,
                         prefix_allowed_tokens_fn=allowed, pad_token_id=0, eos_token_id=None)
    return out[0, n_prompt:].tolist()


def stateless_allowed_fn(trie: ItemTrie, prompt: list[int], cfg: GenerationConfig, history=None):
    """`prefix_allowed_tokens_fn` that replays the constraint from the prompt on every call: assisted and
    prompt-lookup decoding roll rejected candidates back out of `input_ids`, so no state may carry over."""
    n_prompt = len(prompt)
    total = cfg.n_items * (trie.levels + 1)

    def allowed(_batch_id, input_ids):
        gen = input_ids[n_prompt:].tolist()
        if len(gen) >= total:
            return [0]
        cons = make_constraint(trie, prompt, cfg, history)
        for tok in gen:
            cons.advance(tok)
        return list(cons.allowed())

    return allowed


def hf_speculative_list(model, prompt: list[int], trie: ItemTrie, cfg: GenerationConfig, assistant=None,
                        prompt_lookup: int = 0) -> list[int]:
    """Greedy constrained generation through Hugging Face's own speculative decoders: assisted generation with
    `assistant` (a causal LM over the same vocabulary) or prompt-lookup decoding (n-gram candidates copied from
    the prompt). Greedy, so the tokens must equal `hf_generate_list`'s."""
    n_prompt = len(prompt)
    total = cfg.n_items * (trie.levels + 1)
    dev = model.device
    extra = {"assistant_model": assistant} if assistant is not None else {"prompt_lookup_num_tokens": prompt_lookup}
    out = model.generate(torch.tensor([prompt], device=dev),
                         attention_mask=torch.ones(1, n_prompt, dtype=torch.long, device=dev),
                         max_new_tokens=total, min_new_tokens=total, do_sample=False, num_beams=1,
                         prefix_allowed_tokens_fn=stateless_allowed_fn(trie, prompt, cfg), pad_token_id=0,
                         eos_token_id=None, **extra)
    return out[0, n_prompt:].tolist()


def display_rows(rows: list[dict]) -> list[dict]:
    """Bench rows as a narrow table: rounded, and without the per-depth/per-slot lists (they go to the plot)."""
    def r(x, nd):
        return "-" if x is None else round(x, nd)

    return [{
        "decoder": row["decoder"], "draft": row["draft"], "τ": r(row["tau"], 2), "ms": r(row["median_ms"], 1),
        "speedup": r(row["speedup"], 2), "same": row["identical_to_ar"], "draft%": r(
            None if row["draft_share"] is None else 100 * row["draft_share"], 0),
        "draft ms/rnd": r(row.get("draft_ms_per_round"), 2),
        "R@10": r(row["recall@10"], 4), "N@10": r(row["ndcg@10"], 4),
    } for row in rows]


def run_bench(run: Run, drafts: dict, cfg: BenchConfig, progress: bool = True) -> dict:
    """`drafts`: name -> Draft. Returns one row per decoder (τ, median latency, speedup, equality with AR,
    Recall/NDCG@10, acceptance by depth and slot) and the run settings."""
    model = run.load_target(cfg.device)
    trie = ItemTrie(run.sids.all_item_tokens())
    cases = run.dataset.eval_cases(cfg.split, max_history=run.info.max_history)
    if not cases:
        raise PadrecError(f"no {cfg.split} users to benchmark")
    rng = random.Random(cfg.seed)
    cases = rng.sample(cases, min(len(cases), cfg.users + cfg.warmup))
    gen_cfg = GenerationConfig(n_items=cfg.n_items)
    decoders: list[tuple[str, str, object]] = [("ar", "-", lambda p: generate_list(model, p, trie, gen_cfg))]
    if use_fast_target(model):  # the same decoder with the target run by Hugging Face: what the fused path saves
        decoders.append(("ar-hf", "-", lambda p: generate_list(model, p, trie, gen_cfg, fast=False)))
    if cfg.naive_ar:
        decoders.append(("ar-naive", "-", lambda p: generate_list_reference(model, p, trie, gen_cfg)))
    if cfg.hf_generate:
        decoders.append(("hf-generate", "-", lambda p: hf_generate_list(model, p, trie, gen_cfg)))
    if cfg.prompt_lookup:
        decoders.append((f"hf-prompt-lookup{cfg.prompt_lookup}", "-",
                         lambda p: hf_speculative_list(model, p, trie, gen_cfg, prompt_lookup=cfg.prompt_lookup)))
    if cfg.hf_assisted:
        for dname, draft in drafts.items():
            if not draft.uses_target_features and hasattr(draft.model, "generate"):
                decoders.append(("hf-assisted", dname,
                                 lambda p, m=draft.model: hf_speculative_list(model, p, trie, gen_cfg, assistant=m)))
    for dname, draft in drafts.items():
        for tree in cfg.trees:
            spec = SpecConfig(tree=tree)
            decoders.append((SPECULATIVE + tree.label, dname,
                             lambda p, d=draft, s=spec: speculative_generate(model, d, p, trie, gen_cfg, s)))

    times = {i: [] for i in range(len(decoders))}
    outputs = {i: [] for i in range(len(decoders))}
    stats = {i: [] for i in range(len(decoders))}
    mismatches = {i: 0 for i in range(len(decoders))}
    with torch.inference_mode():
        for u, case in enumerate(tqdm(cases, desc="bench users", disable=not progress)):
            prompt = run.prompt(case.history)
            ref_tokens = None
            for i, (_kind, _draft, fn) in enumerate(decoders):
                t0 = time.perf_counter()
                res = fn(prompt)
                dt = time.perf_counter() - t0
                tokens = res if isinstance(res, list) else res.tokens
                if u < cfg.warmup:
                    continue
                if i == 0:
                    ref_tokens = tokens
                elif tokens != ref_tokens:
                    mismatches[i] += 1
                times[i].append(dt)
                outputs[i].append(trie.parse_items(tokens) if isinstance(res, list) else res.items)
                stats[i].append(getattr(res, "stats", None) or {"target_forwards": getattr(res, "model_calls", None)})
    targets = [c.targets for c in cases[cfg.warmup:]]
    rows = []
    ar_times = times[0]
    for i, (kind, dname, _fn) in enumerate(decoders):
        t = times[i]
        ratios = [a / b for a, b in zip(ar_times, t)]
        st = stats[i]
        tokens_total = cfg.n_items * (trie.levels + 1)
        fwd = [s.get("target_forwards") for s in st if s.get("target_forwards")]
        row = {
            "decoder": kind, "draft": dname,
            "tau": statistics.mean(tokens_total / f for f in fwd) if fwd else None,
            "median_ms": 1000 * statistics.median(t),
            "speedup": statistics.median(ratios),
            "speedup_of_medians": statistics.median(ar_times) / statistics.median(t),
            "identical_to_ar": f"{len(t) - mismatches[i]}/{len(t)}" if i else "ref",
            "draft_share": statistics.mean(s["draft_time_share"] for s in st) if "draft_time_share" in st[0] else None,
            # the draft's own cost, in ms per speculative round (PAD-Rec's module must keep this flat)
            "draft_ms_per_round": (1000 * sum(s["draft_time_s"] for s in st) / max(1, sum(s["rounds"] for s in st))
                                   if "draft_time_s" in st[0] else None),
            **{k: v for k, v in ranking_metrics(outputs[i], targets, ks=(10,)).items()},
        }
        if "accept_by_depth" in st[0]:
            row["accept_by_depth"] = _sum_rates([s["accept_by_depth"] for s in st])
            row["accept_by_slot"] = _sum_rates([s["accept_by_slot"] for s in st])
        rows.append(row)
    return {"rows": rows, "users": len(ar_times), "warmup": cfg.warmup, "n_items": cfg.n_items,
            "speedup_definition": "median over users of (AR time / decoder time), same user back to back",
            "threads": torch.get_num_threads(), "device": device_name(cfg.device)}


def load_run_results(out) -> dict:
    """The per-run results already in a benchmark JSON (so runs can be added one invocation at a time)."""
    out = Path(out)
    return json.loads(out.read_text())["runs"] if out.is_file() else {}


def save_run_results(out, script: str, argv: list[str], runs: dict) -> None:
    """Write a benchmark JSON: the command that produced it, the machine and commit, and the per-run results."""
    atomic_write_text(out, json.dumps({"command": " ".join([script, *argv]), "machine": machine_description(),
                                       "runs": runs}, indent=2))


def _sum_rates(per_user: list[list[list[int]]]) -> list[float | None]:
    n = len(per_user[0])
    att = [sum(u[j][0] for u in per_user) for j in range(n)]
    acc = [sum(u[j][1] for u in per_user) for j in range(n)]
    return [a / b if b else None for a, b in zip(acc, att)]


def plot_acceptance(result: dict, out) -> object | None:
    """Acceptance rate by draft depth and by within-item slot, one line per speculative configuration."""
    rows = [r for r in result["rows"] if "accept_by_depth" in r]
    if not rows:
        return None
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        label = f"{r['draft']}: {r['decoder']}"
        d = r["accept_by_depth"]
        ax1.plot(range(1, len(d) + 1), [x if x is not None else float("nan") for x in d], marker="o", label=label)
        s = r["accept_by_slot"]
        ax2.plot(range(len(s)), [x if x is not None else float("nan") for x in s], marker="s", label=label)
    ax1.set(xlabel="draft depth", ylabel="acceptance rate", title="acceptance by depth", ylim=(0, 1.05))
    n_slots = len(rows[0]["accept_by_slot"])
    ax2.set_xticks(range(n_slots), [f"level {i}" for i in range(n_slots - 1)] + ["SEP"])
    ax2.set(ylabel="acceptance rate", title="acceptance by within-item slot", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    return save_figure(fig, out)
