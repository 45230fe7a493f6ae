"""The `padrec` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from padrec import PadrecError

DRAFT_KINDS = ("eagle", "hass", "padrec", "lm")  # drafts/kinds.py's table (a test keeps the two equal)


class _Deprecated(argparse.Action):
    """An old spelling of a flag: it still works, and says what replaced it."""

    def __init__(self, option_strings, dest, new: str, **kw):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"padrec: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _deprecated(p: argparse.ArgumentParser, old: str, new: str, dest: str, **kw) -> None:
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, **kw)


def _rank_args(p: argparse.ArgumentParser, modes_default: str) -> None:
    p.add_argument("--mode", default=modes_default, help="beam, list, or both (comma separated)")
    p.add_argument("--beam-size", type=int, default=20, help="beam width; beam mode returns this many items")
    p.add_argument("--n-items", type=int, default=10, help="items generated in list mode")
    p.add_argument("--sample", action="store_true", help="list mode: sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item of the history")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _rank_configs(a) -> list:
    from padrec.evaluation.evaluate import RankConfig

    modes = [m.strip() for m in a.mode.split(",")] if a.mode != "both" else ["beam", "list"]
    return [
        RankConfig(mode=m, beam_size=a.beam_size, n_items=a.n_items, do_sample=a.sample, temperature=a.temperature,
                   top_k=a.top_k, top_p=a.top_p, exclude_history=a.exclude_history, batch_size=a.batch_size)
        for m in modes
    ]


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sids", "--method", dest="method", default="rq-kmeans",
                   choices=["rq-kmeans", "rq-vae", "provided"], help="how items get semantic IDs")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--vocab", default="per_level", choices=["per_level", "shared"], help="token layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-history", type=int, default=20)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="tiny, small, deep, deeper, medium, large")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--time-budget-min", type=float, default=None, help="stop after the epoch that crosses it")
    p.add_argument("--base-model", default=None, help="a local HF causal-LM checkpoint to fine-tune")
    p.add_argument("--no-resume", action="store_true", help="start over even if an interrupted run exists")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    _deprecated(p, "--train-seed", "--seed", "seed", type=int)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout on the embeddings and every block's output, in training (0: none)")
    p.add_argument("--select-by", default="loss", choices=["loss", "recall@10", "ndcg@10"],
                   help="the best epoch by validation loss, or by the validation queries' beam-20 ranking")


def _train_config(a):
    from padrec.training.target_trainer import TrainConfig

    return TrainConfig(preset=a.preset, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, patience=a.patience,
                       time_budget_min=a.time_budget_min, base_model=a.base_model, threads=a.threads,
                       seed=a.seed, dropout=a.dropout, select_by=a.select_by)


def _tokenizer_config(a):
    from padrec.tokenizer.build import TokenizerConfig

    return TokenizerConfig(method=a.method, levels=a.levels, codebook_size=a.codebook_size, layout=a.vocab,
                           seed=a.seed)


def cmd_data(a) -> None:
    from padrec.data.dataset import list_datasets, load_dataset
    from padrec.ui import console, table

    if a.data_cmd == "list":
        names = list_datasets()
        console.print(table([load_dataset(n).stats() for n in names], title="datasets"))
    elif a.data_cmd == "stats":
        s = load_dataset(a.name).stats()
        console.print(table([{"statistic": k, "value": v} for k, v in s.items()], title=a.name))
    elif a.data_cmd == "import":
        from padrec.data.importer import REPORT_FILE, import_with_report

        items = Path(a.items) if a.items else None
        path, report = import_with_report(a.name, Path(a.interactions), items, split=a.split,
                                          overwrite=a.overwrite, options=_import_options(a))
        console.print(table(report.summary_rows(), title=f"import report: {a.name}"))
        for note in report.notes:
            console.print(f"note: {note}")
        console.print(f"imported {a.name!r} into {path} (report: {path / REPORT_FILE})")
        s = load_dataset(a.name, path.parent).stats()
        console.print(table([{"statistic": k, "value": v} for k, v in s.items()], title=a.name))


def _import_options(a):
    from padrec.data.fields import ColumnMap
    from padrec.data.importer import ImportOptions

    columns = ColumnMap(**{f: getattr(a, f"{f}_col") for f in ColumnMap.__dataclass_fields__})
    return ImportOptions(columns=columns, **{f: getattr(a, f) for f in ImportOptions.__dataclass_fields__
                                             if f != "columns"})


def cmd_tokenize(a) -> None:
    from padrec.pipeline import tokenize
    from padrec.ui import console

    run = tokenize(Path(a.run), a.dataset, _tokenizer_config(a), a.max_history)
    console.print(f"run directory: {run.path}")


def cmd_import_model(a) -> None:
    from padrec.run import Run
    from padrec.ui import console, table

    run = Run.create_imported(Path(a.run), a.manifest, a.dataset)
    rep = run.info.extra["imported"]["report"]
    console.print(table([{"check": k, "value": v} for k, v in rep.items()], title=f"imported {a.manifest}"))
    console.print(f"run directory: {run.path} (its target is your checkpoint, read in place; every padrec command "
                  "takes --run)")


def cmd_parity(a) -> None:
    import torch

    from padrec.evaluation.parity import parity_report
    from padrec.files import atomic_write_text
    from padrec.run import Run
    from padrec.ui import console, table

    torch.set_num_threads(a.threads) if a.threads else None
    run = Run(a.run)
    rep = parity_report(run, a.users, a.beam_k)
    rows = [{"user": r["user"], "same": r["same"], "cause": r["cause"], "padrec": r["padrec"][:5], "hf": r["hf"][:5]}
            for r in rep["rows"] if not r["same"]][: a.show]
    if rows:
        console.print(table(rows, title="users whose lists differ (first 5 items)"))
    console.print(f"padrec beam search vs Hugging Face generate(num_beams={a.beam_k}) on {rep['users']} test users "
                  f"({rep['dtype']}): {rep['identical']} identical lists, mean overlap {rep['mean_overlap']:.3f}; "
                  f"causes {rep['causes']}")
    out = Path(a.out) if a.out else run.results_dir / f"parity_k{a.beam_k}.json"
    atomic_write_text(out, json.dumps({"command": a.command_line, **rep}, indent=2))
    console.print(f"report: {out}")


def cmd_train_target(a) -> None:
    from padrec.pipeline import plot_training_curve
    from padrec.run import Run
    from padrec.training.target_trainer import train_target
    from padrec.ui import console, table

    from padrec.training import distributed as dist

    run = Run(a.run)
    out = train_target(run, _train_config(a), resume=not a.no_resume)
    if not dist.is_main():
        return
    console.print(table([{k: v for k, v in h.items() if k != "improved"} for h in out["history"]],
                        title=f"target training ({out['n_params'] / 1e6:.1f}M parameters)"))
    png = plot_training_curve(run)
    console.print(f"best checkpoint: {run.target_dir}" + (f"; curve: {png}" if png else ""))


def cmd_evaluate(a) -> None:
    import torch

    from padrec.pipeline import evaluate
    from padrec.run import Run

    if a.threads:
        torch.set_num_threads(a.threads)
    evaluate(Run(a.run), a.split, _rank_configs(a), limit=a.limit)


def cmd_baseline(a) -> None:
    import torch

    from padrec.baselines.evaluate import baseline_rows, default_dir
    from padrec.baselines.sasrec import SASRecConfig, train_sasrec
    from padrec.data.dataset import load_dataset
    from padrec.files import atomic_write_text
    from padrec.pipeline import metrics_table
    from padrec.provenance import machine_description
    from padrec.ui import console

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset(a.dataset)
    out = Path(a.out) if a.out else default_dir(a.dataset)
    train = None
    if a.name == "sasrec":
        cfg = SASRecConfig(epochs=a.epochs, patience=a.patience, time_budget_min=a.time_budget_min, seed=a.seed,
                           threads=a.threads, layers=a.layers, hidden=a.hidden, dropout=a.dropout, max_len=a.max_len)
        train = train_sasrec(ds, cfg, out / "sasrec", resume=not a.no_resume)
    result = {"dataset": a.dataset, "baseline": a.name, "command": a.command_line, "machine": machine_description()}
    for split in ("valid", "test"):
        rows = baseline_rows(ds, split, a.limit, out / "sasrec" if a.name == "sasrec" else None)
        rows = [r for r in rows if (r["label"] == "SASRec") == (a.name == "sasrec")]
        result[split] = rows
        console.print(metrics_table(rows, title=f"{a.dataset} - {split} ({rows[0]['users']} users)"))
    if train is not None:
        result["train_seconds"], result["epochs"] = train["train_seconds"], len(train["history"])
    path = out / f"{a.name}_eval.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    console.print(f"results written to {path}")


def cmd_recommend(a) -> None:
    from padrec.api import Recommender
    from padrec.files import atomic_write_text
    from padrec.training import distributed as dist
    from padrec.ui import console, table

    rec = Recommender(a.run, threads=a.threads)
    cfg = _rank_configs(a)[0]
    spec = _recommend_spec(a, cfg)
    draft = _default_draft(rec.run, a.draft) if a.decoder == "sd" else None
    if a.history is not None:
        history = [h.strip() for h in a.history.split(",") if h.strip()]
        rows = rec.recommend(history, k=cfg.list_length, mode=cfg.mode, beam_size=cfg.beam_size,
                             exclude_history=cfg.exclude_history, decoder=a.decoder, draft=draft, spec=spec)
        if dist.is_main():
            console.print(table(rows, title="recommendations" + (f" (speculative, draft {draft})" if draft else "")))
        return
    if not a.out:
        raise PadrecError("give --out FILE (to rank the users of a split) or --history ID,ID,...")
    cases = rec.run.dataset.eval_cases(a.dataset_split, max_history=rec.run.info.max_history)
    if a.limit:
        cases = cases[: a.limit]
    if a.decoder == "sd":
        lines, summary = _recommend_speculative(rec, cases, cfg, draft, spec)
    else:
        lines, summary = _recommend_batched(rec, cases, cfg)
    if dist.is_main():
        atomic_write_text(Path(a.out), "\n".join(lines) + "\n")
        console.print(f"wrote {len(lines)} users' {cfg.mode} lists to {a.out}")
        for line in summary:
            console.print(line)


def _default_draft(run, name: str | None) -> str:
    from padrec.drafts.registry import default_draft

    name = name or default_draft(run)
    if name is None:
        raise PadrecError(f"--decoder sd needs a trained draft and run {run.path} has none; "
                          f"train one with `padrec train-draft --run {run.path}`")
    return name


def _recommend_spec(a, cfg):
    """None for --decoder ar; the chain/tree of list mode or the beam settings of beam mode for --decoder sd."""
    beam_flags = [f"--{f.replace('_', '-')}" for f in ("verify", "draft_beams", "gamma") if getattr(a, f) is not None]
    tree_flags = [f"--{f}" for f in ("chain", "tree") if getattr(a, f) is not None]
    if a.decoder == "sd" and cfg.mode == "beam":
        if cfg.do_sample or tree_flags:
            raise PadrecError("speculative beam search is deterministic top-K: it takes no --sample, --chain or "
                              "--tree (those are list mode's)")
        from padrec.speculative.beam import BeamSpecConfig

        return BeamSpecConfig.for_beam_width(cfg.beam_size, a.draft_beams, a.gamma, a.verify or "strict")
    if beam_flags:
        raise PadrecError(f"{', '.join(beam_flags)} belong to speculative beam search (--mode beam --decoder sd)")
    if a.decoder == "sd":
        return _spec_config(a)
    if tree_flags:
        raise PadrecError(f"{', '.join(tree_flags)} belong to speculative decoding (--decoder sd)")
    return None


def _recommend_batched(rec, cases, cfg) -> tuple[list[str], list[str]]:
    import time

    from padrec.evaluation.evaluate import rank_histories_sharded
    from padrec.training import distributed as dist

    items = rec.run.dataset.items
    t0 = time.perf_counter()
    rankings = rank_histories_sharded(rec.model, rec.run, rec.trie, [c.history for c in cases], cfg,
                                      progress=dist.is_main())
    seconds = time.perf_counter() - t0
    lines = [json.dumps({"user": c.user, "items": [items[i].raw_id for i in r]}) for c, r in zip(cases, rankings)]
    return lines, [f"autoregressive, batched ({cfg.batch_size} users per model call): {len(cases) / seconds:.1f} "
                   f"users/s. For one request's latency, --decoder sd (batch 1) is the faster path on a deep target."]


def _recommend_speculative(rec, cases, cfg, draft: str, spec) -> tuple[list[str], list[str]]:
    """Batch 1 per user (so any split of the users over torchrun ranks gives the same lists), then the batched AR
    path timed on a sample of the same users: the summary states what each path is for."""
    import time

    from tqdm.auto import tqdm

    from padrec.training import distributed as dist

    items = rec.run.dataset.items
    records = []
    t0 = time.perf_counter()
    for c in tqdm(dist.shard(cases), desc="speculative decoding", unit="user", disable=not dist.is_main()):
        if cfg.mode == "beam":
            ranked, scores, stats = rec.recommend_speculative_beam(list(c.history), cfg, draft, spec)
            extra = {"scores": scores, "tau": stats["tau"], "fallback": stats["fallback"]}
        else:
            ranked, tau = rec.recommend_speculative(list(c.history), cfg, draft, spec)
            extra = {"tau": tau}
        records.append({"user": c.user, "items": [items[i].raw_id for i in ranked], **extra})
    seconds = dist.all_reduce_sum([time.perf_counter() - t0])[0] / dist.world_size()
    records = [r for part in dist.all_gather_objects(records) for r in part]
    summary = [f"speculative decoding, batch 1 (draft {draft}): {len(records) / seconds:.1f} users/s, "
               f"{1000 * seconds / max(1, len(records)):.1f} ms per user, mean τ "
               f"{sum(r['tau'] for r in records) / max(1, len(records)):.2f}"]
    if cfg.mode == "beam":
        fell = sum(r["fallback"] for r in records)
        summary.append(f"strict verification: the same items, order and scores as plain beam search; {fell} of "
                       f"{len(records)} users were handed to plain beam search (a float near-tie)"
                       if spec.verify == "strict" else
                       "relaxed verification (AtSpeed-R): sampled lists, NOT plain beam search's answer")
    summary.append(_batched_throughput(rec, cases, cfg))
    return [json.dumps(r) for r in records], summary


def _batched_throughput(rec, cases, cfg, sample: int = 256) -> str:
    import time

    import torch

    from padrec.evaluation.evaluate import rank_histories

    some = cases[:sample]
    t0 = time.perf_counter()
    with torch.inference_mode():
        rank_histories(rec.model, rec.run, rec.trie, [c.history for c in some], cfg, progress=False)
    rate = len(some) / (time.perf_counter() - t0)
    return (f"autoregressive, batched ({cfg.batch_size} users per model call), timed on {len(some)} of these users: "
            f"{rate:.1f} users/s. Speculative decoding is batch-1 latency decoding (one request as fast as "
            f"possible, e.g. `padrec serve`); for scoring many users offline the batched path has the throughput.")


def _spec_config(a):
    from padrec.speculative.decoder import SpecConfig

    if a.chain is None and a.tree is None:
        return SpecConfig()  # its default shape
    return SpecConfig(tree=_tree_configs(a)[0])


def _tree_configs(a) -> list:
    from padrec.speculative.tree import TreeConfig

    trees = TreeConfig.parse_list(a.chain, a.tree)
    if not trees:
        raise PadrecError("give at least one --chain GAMMA or --tree DEPTH,TOPK,TOTAL")
    return trees


def cmd_train_draft(a) -> None:
    from padrec.drafts.train import DraftTrainConfig, train_draft
    from padrec.run import Run
    from padrec.ui import console, table

    off = set(filter(None, (a.ablate or "").split(",")))
    unknown = off - {"ipe", "spe", "gate", "alpha"}
    if unknown:
        raise PadrecError(f"--ablate takes ipe,spe,gate,alpha; unknown: {', '.join(sorted(unknown))}")
    cfg = DraftTrainConfig(kind=a.kind, name=a.name, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                           seed=a.seed, time_budget_min=a.time_budget_min, threads=a.threads, padrec_base=a.base,
                           hass_steps=a.steps, hass_topk=a.top_k, ipe="ipe" not in off, spe="spe" not in off,
                           gate="gate" not in off, learn_alpha="alpha" not in off, align=a.align,
                           align_weight=a.align_weight, align_topk=a.align_top_k, init_from=a.init_from,
                           list_valid_users=a.list_valid_users, list_train_users=a.list_train_users)
    out = train_draft(Run(a.run), cfg, resume=not a.no_resume)
    hist = [{k: v for k, v in h.items() if not isinstance(v, (list, dict))} for h in out["history"]]
    console.print(table(hist, title=f"draft {out['name']} ({out['n_params'] / 1e6:.2f}M parameters)"))
    console.print(f"saved to {out['path']}")


def cmd_calibrate(a) -> None:
    import torch

    from padrec.drafts.registry import load_draft
    from padrec.run import Run
    from padrec.speculative.calibration import calibrate_draft
    from padrec.ui import console, table

    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a.run)
    draft = load_draft(run, a.draft, acceptance=False)  # the table is what is refitted: stale or not, unread
    model = calibrate_draft(run, a.draft, draft, run.load_target(), users=a.users, depth=a.depth)
    rows = [{"slot": s, "nodes": model.samples[s], "margin cuts": ", ".join(f"{c:.2f}" for c in model.edges[s]),
             "P(top-1 taken) per bucket": ", ".join(f"{b[0]:.2f}" for b in model.probs[s]),
             "P(top-2 taken) per bucket": ", ".join(f"{b[1]:.2f}" for b in model.probs[s])}
            for s in range(model.levels)]
    console.print(table(rows, title=f"acceptance of draft {a.draft!r} by item slot and draft margin bucket"))


def cmd_list_agreement(a) -> None:
    import torch

    from padrec.drafts.target_lists import list_agreement
    from padrec.provenance import machine_description
    from padrec.run import Run
    from padrec.files import atomic_write_text
    from padrec.ui import console, table

    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a.run)
    names = [n for n in a.drafts.split(",") if n]
    if not names:
        raise PadrecError("--drafts needs at least one draft name")
    rows = list_agreement(run, names, users=a.users, steps=a.steps, split=a.split, seed=a.seed)
    shown = [{"draft": r["draft"], **{f"step {j + 1}": round(v, 3) for j, v in enumerate(r["agreement_by_step"])},
              "mean": round(r["mean"], 3),
              "by level (step 1)": "/".join(f"{v:.3f}" for v in r["agreement_per_level"]),
              "training valid (by step)": "/".join(f"{v:.3f}" for v in r["train_valid_agreement_by_step"] or [])}
             for r in rows]
    console.print(table(shown, title=f"{run.info.dataset}: draft top-1 = target top-1 along the target's greedy "
                                     f"lists of {rows[0]['users']} {a.split} users"))
    if a.out:
        result = {"run": str(run.path), "dataset": run.info.dataset, "split": a.split, "users": rows[0]["users"],
                  "steps": a.steps, "rows": rows, "machine": machine_description(), "command": a.command_line}
        atomic_write_text(Path(a.out), json.dumps(result, indent=2))
        console.print(f"written {a.out}")


def _ensure_acceptance(run, drafts: dict, trees, device: str) -> None:
    """Calibrated trees need each draft's acceptance table: fit the missing ones now, before any timing."""
    from padrec.speculative.calibration import calibrate_draft

    if not any(t.score == "calibrated" for t in trees):
        return
    target = None
    for name, draft in drafts.items():
        if draft.acceptance is None:
            target = target or run.load_target(device)
            calibrate_draft(run, name, draft, target)


def cmd_bench(a) -> None:
    import torch

    from padrec.drafts.registry import load_draft
    from padrec.evaluation.bench import BenchConfig, display_rows, plot_acceptance, run_bench
    from padrec.provenance import machine_description
    from padrec.run import Run
    from padrec.files import atomic_write_text
    from padrec.ui import console, table

    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a.run)
    drafts = {name: load_draft(run, name, a.device) for name in a.drafts.split(",") if name}
    if a.mode == "beam":
        return _bench_beam(a, run, drafts)
    cfg = BenchConfig(users=a.users, warmup=a.warmup, n_items=a.n_items, trees=_tree_configs(a),
                      naive_ar=not a.no_naive, hf_generate=not a.no_hf, hf_assisted=not a.no_hf,
                      prompt_lookup=0 if a.no_hf else a.prompt_lookup, device=a.device)
    _ensure_acceptance(run, drafts, cfg.trees, a.device)
    result = run_bench(run, drafts, cfg)
    result.update(run=str(run.path), dataset=run.info.dataset, machine=machine_description(),
                  command=a.command_line)
    out = Path(a.out) if a.out else run.results_dir / "bench.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    shown = display_rows(result["rows"])
    console.print(table(shown, title=f"{run.info.dataset}: batch-1 list-wise greedy, {cfg.n_items} items, "
                                     f"{result['users']} users, {result['device']}, {result['threads']} threads"))
    png = plot_acceptance(result, out.with_suffix(".png"))
    console.print(f"written {out}" + (f" and {png}" if png else ""))


def _bench_beam(a, run, drafts) -> None:
    from padrec.evaluation.beam_bench import BeamBenchConfig, display_beam_rows, run_beam_bench
    from padrec.provenance import machine_description
    from padrec.files import atomic_write_text
    from padrec.ui import console, table

    def ints(text):
        return [int(x) for x in text.split(",") if x]

    modes = [m for m in a.verify.split(",") if m]
    if not drafts or not modes or set(modes) - {"strict", "relaxed"}:
        raise PadrecError("--mode beam needs --drafts NAME[,NAME] and --verify strict,relaxed (or one of them)")
    cfg = BeamBenchConfig(users=a.users, warmup=a.warmup, ks=ints(a.beam_k), draft_beams=ints(a.draft_beams),
                          gammas=ints(a.gamma), modes=modes,
                          temperatures=[float(x) for x in a.relaxed_temperature.split(",") if x], device=a.device)
    result = run_beam_bench(run, drafts, cfg)
    result.update(run=str(run.path), dataset=run.info.dataset, machine=machine_description(),
                  command=a.command_line)
    out = Path(a.out) if a.out else run.results_dir / "bench_beam.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    console.print(table(display_beam_rows(result["rows"]),
                        title=f"{run.info.dataset}: batch-1 top-K beam search, {result['users']} users, "
                              f"{result['threads']} threads; τ = {result['levels']} beam levels / target forwards"))
    console.print(f"{result['baseline']}; speedup = median over users of plain/speculative time, pair by pair")
    console.print(f"written {out}")


def cmd_demo(a) -> None:
    from padrec.demo import run_demo, run_zoo_demo

    if a.from_scratch:
        run_demo(Path(a.out), dataset=a.dataset, preset=a.preset, time_budget_min=a.time_budget_min, quick=a.quick,
                 threads=a.threads)
    else:
        if a.quick or a.time_budget_min is not None:
            raise PadrecError("--quick and --time-budget-min belong to `padrec demo --from-scratch`")
        run_zoo_demo(a.zoo, users=a.users, bench_users=a.bench_users, threads=a.threads)


def cmd_serve(a) -> None:
    from padrec.serving.server import serve_http, serve_ray
    from padrec.serving.service import ServeSettings

    settings = ServeSettings(max_history=a.max_history, max_k=a.max_k, max_batch=a.max_batch, threads=a.threads,
                             max_body_bytes=a.max_body_bytes)
    if a.ray:
        serve_ray(a.run, a.host, a.port, settings, replicas=a.replicas)
    elif a.replicas != 1:
        raise PadrecError("--replicas N needs --ray (one uvicorn process serves one model)")
    else:
        serve_http(a.run, a.host, a.port, settings)


def cmd_zoo(a) -> None:
    from padrec import zoo
    from padrec.ui import console, table

    if a.zoo_cmd == "list":
        rows = [_zoo_row(name) for name in zoo.list_models()]
        console.print(table(rows, title=f"model zoo ({zoo.zoo_root()})") if rows else "the model zoo is empty")
    elif a.zoo_cmd == "copy":
        dest = zoo.copy_model(a.name, Path(a.dir))
        console.print(f"zoo model {a.name!r} copied to {dest} (every file checked against its sha256)")
    elif a.zoo_cmd == "pack":
        import torch

        from padrec.zoo_pack import PackConfig, pack

        if a.threads:
            torch.set_num_threads(a.threads)

        cfg = PackConfig(name=a.name, drafts=tuple(a.drafts.split(",")) if a.drafts else None, dtype=a.dtype,
                         check_users=a.check_users or None, description=a.description,
                         commands=tuple(a.made_by), baselines_file=a.baselines_file)
        console.print(f"packed into {pack(zoo.resolve_run(a.run), cfg)}")
    else:
        from padrec.zoo_pack import add_bench

        console.print(f"bench results added to {add_bench(a.name, Path(a.bench))}")


def _zoo_row(name: str) -> dict:
    from padrec import zoo

    path = zoo.model_dir(name)
    m = zoo.read_manifest(path)
    try:
        zoo.verify(path, m)
        files = "ok"
    except PadrecError as e:
        files = f"BAD: {e}"
    test = {r["label"]: r for r in m.get("test", [])}
    beam, sas = test.get("target beam20", {}), test.get("SASRec", {})
    speed = m.get("speed", {})
    return {"name": name, "dataset": m.get("dataset"), "target": m["target"].get("shape"),
            "MB": round(zoo.size_bytes(path, m) / 2**20, 1), "drafts": ", ".join(m.get("drafts", {})),
            "R@10 beam20": beam.get("recall@10"), "N@10 beam20": beam.get("ndcg@10"),
            "R@10 list10": test.get("target list10", {}).get("recall@10"), "R@10 SASRec": sas.get("recall@10"),
            "SD speedup": speed.get("speedup"), "best SD": speed.get("decoder"), "files": files}


def _import_args(q) -> None:
    from padrec.data.fields import ColumnMap
    from padrec.data.importer import POLICIES, ImportOptions
    from padrec.data.tables import FORMATS

    q.add_argument("--name", required=True)
    q.add_argument("--interactions", required=True,
                   help="user, item, timestamp (or order) rows: .csv, .tsv, .jsonl or RecBole .inter (optionally .gz)")
    q.add_argument("--items", help="id, title[, categories, brand, description] rows: .csv, .tsv, .jsonl or RecBole "
                   ".item; without it every item comes from the interactions, with no text")
    q.add_argument("--split", default="loo", choices=["loo", "time"])
    q.add_argument("--overwrite", action="store_true", help="replace a dataset of that name")
    for f in ColumnMap.__dataclass_fields__:
        q.add_argument(f"--{f.replace('_', '-')}-col", dest=f"{f}_col", metavar="NAME",
                       help=f"column holding the {f.replace('_', ' ')} (default: found by its usual names)")
    helps = {"unknown_items": "interactions naming an item absent from the items file",
             "duplicate_items": "item rows repeating an id with other fields",
             "duplicate_interactions": "rows repeating an earlier (user, item, time)",
             "bad_rows": "rows with an empty id / time or a time that does not parse",
             "encoding_errors": "bytes that are not valid in --encoding"}
    for f, choices in POLICIES.items():
        q.add_argument(f"--{f.replace('_', '-')}", choices=choices, default=getattr(ImportOptions, f),
                       help=f"{helps[f]} (default: %(default)s; every one is counted in the report)")
    q.add_argument("--min-user-interactions", type=int, default=ImportOptions.min_user_interactions, metavar="N",
                   help="drop users with fewer interactions (default: %(default)s, keep everyone)")
    q.add_argument("--encoding", default=ImportOptions.encoding,
                   help="text encoding of both files (default: %(default)s)")
    q.add_argument("--categories-sep", default=ImportOptions.categories_sep,
                   help="separator of categories in CSV / TSV text (default: %(default)s)")
    q.add_argument("--delimiter", default=ImportOptions.delimiter,
                   help="field delimiter of CSV / TSV files (default: ',' for .csv, tab for .tsv)")
    for f in ("interactions_format", "items_format"):
        q.add_argument(f"--{f.replace('_', '-')}", choices=FORMATS, default=None,
                       help="file format (default: from the file name's suffix)")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="bundled and imported datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    dsub.add_parser("list", help="list datasets with their counts")
    q = dsub.add_parser("stats", help="users, items, interactions, split sizes")
    q.add_argument("name")
    q = dsub.add_parser("import", help="import your own interactions + items files (CSV, TSV, JSONL, RecBole)",
                        description="Import an interaction log and an item table as a dataset. Every row read is "
                        "accounted for in the printed import report, saved beside the dataset (data/README.md).")
    _import_args(q)
    p.set_defaults(func=cmd_data)


def _add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="build semantic IDs for a dataset into a new run directory")
    p.add_argument("--dataset", required=True)
    p.add_argument("--run", required=True, help="run directory to create")
    _tokenizer_args(p)
    p.set_defaults(func=cmd_tokenize)


def _add_import_model(sub) -> None:
    p = sub.add_parser("import-model", help="your trained LC-Rec / MiniOneRec-style checkpoint as a run's target, "
                       "as it is (docs/BRING_YOUR_OWN_MODEL.md)")
    p.add_argument("--manifest", required=True, help="JSON: model_dir, item_index, prompt or chat, item_end, ...")
    p.add_argument("--dataset", required=True, help="the padrec dataset of its users and items (padrec data import)")
    p.add_argument("--run", required=True, help="run directory to create")
    p.set_defaults(func=cmd_import_model)


def _add_parity(sub) -> None:
    p = sub.add_parser("parity", help="an imported model: padrec's constrained beam search vs your own Hugging Face "
                       "generate(num_beams=K, prefix_allowed_tokens_fn=...), user by user, with the cause of each "
                       "difference")
    p.add_argument("--run", required=True)
    p.add_argument("--users", type=int, default=50, help="the first N test users")
    p.add_argument("--beam-k", type=int, default=10)
    p.add_argument("--show", type=int, default=10, help="differing users to print")
    p.add_argument("--out", default=None, help="report JSON (default: RUN/results/parity_kK.json)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_parity)


def _add_train_target(sub) -> None:
    p = sub.add_parser("train-target", help="train (or resume) the run's target LM")
    p.add_argument("--run", required=True)
    _train_args(p)
    p.set_defaults(func=cmd_train_target)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Recall/NDCG@K of the run's target on a split")
    p.add_argument("--run", required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int, default=None, help="only the first N users")
    _rank_args(p, "both")
    p.set_defaults(func=cmd_evaluate)


def _add_baseline(sub) -> None:
    p = sub.add_parser("baseline", help="what a user would deploy instead: MostPop or SASRec, on the same split and "
                       "metrics as the targets")
    p.add_argument("name", choices=["pop", "sasrec"])
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", default=None, help="folder of the dataset's baselines (default: runs/baselines/DATASET; "
                   "`padrec evaluate` shows the SASRec trained there beside the target)")
    p.add_argument("--limit", type=int, default=None, help="only the first N users of each split")
    p.add_argument("--epochs", type=int, default=200, help="sasrec: at most this many epochs")
    p.add_argument("--patience", type=int, default=10, help="sasrec: epochs without validation Recall@10 gain")
    p.add_argument("--time-budget-min", type=float, default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--max-len", type=int, default=50, help="sasrec: most recent items it reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_baseline)


def _add_recommend(sub) -> None:
    p = sub.add_parser("recommend", help="ranked lists as JSONL for a split's users, or for one --history")
    p.add_argument("--run", required=True)
    p.add_argument("--dataset-split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--history", default=None, help="comma-separated item ids (the dataset's own ids)")
    p.add_argument("--decoder", default="ar", choices=["ar", "sd"],
                   help="ar: batched autoregressive decoding (throughput: many users per model call); sd: "
                        "speculative decoding, one user at a time (latency), the same lists (beam: strict)")
    p.add_argument("--draft", default=None, help="--decoder sd: draft name (default: eagle if trained, else the first)")
    p.add_argument("--chain", default=None, help="sd, list mode: chain of γ drafted tokens (default: 8, unless --tree)")
    p.add_argument("--tree", default=None, help="sd, list mode: DEPTH,TOPK,TOTAL[,cal[@P]] of a dynamic tree instead")
    p.add_argument("--verify", default=None, choices=["strict", "relaxed"],
                   help="sd, beam mode: strict (default: plain beam search's items, order and scores) or relaxed "
                        "(AtSpeed-R, sampled: not lossless)")
    p.add_argument("--draft-beams", type=int, default=None,
                   help="sd, beam mode: drafted nodes per level N >= K (default max(2K, 40): with γ 3, the fastest "
                        "strict setting measured at K = 10 and 20 on zoo:beauty, 2-core CPU)")
    p.add_argument("--gamma", type=int, default=None, help="sd, beam mode: drafted levels per round (default 3)")
    _rank_args(p, "beam")
    p.set_defaults(func=cmd_recommend)


def _add_train_draft(sub) -> None:
    p = sub.add_parser("train-draft", help="train a draft model for the run's target")
    p.add_argument("--run", required=True)
    p.add_argument("--kind", default="eagle", choices=DRAFT_KINDS,
                   help="eagle: feature-level head; hass: the same head trained over unrolled steps; "
                        "padrec: the head + item-slot and draft-step embeddings; lm: independent small LM")
    _deprecated(p, "--draft", "--kind (--draft names a trained draft in the other commands)", "kind",
                choices=DRAFT_KINDS)
    p.add_argument("--base", default="hass", choices=["eagle", "hass"], help="padrec: how the head is trained")
    p.add_argument("--steps", type=int, default=3, help="hass/padrec(hass): unrolled training steps")
    p.add_argument("--top-k", type=int, default=0, help="hass: token loss over the target's top-k only (0 = all)")
    _deprecated(p, "--topk", "--top-k", "top_k", type=int)
    p.add_argument("--ablate", default=None,
                   help="padrec: parts to switch off, comma-separated: ipe, spe, gate (plain addition), "
                        "alpha (fixed at 1)")
    p.add_argument("--align", default=None, choices=["strict", "relaxed"],
                   help="add AtSpeed top-K alignment along the target's beams: strict (reverse KL on the draft's "
                        "top-K + density) for strict speculative beam search, relaxed (TVD) for relaxed")
    p.add_argument("--align-weight", type=float, default=0.5, help="weight of the alignment term")
    p.add_argument("--align-top-k", type=int, default=10, help="K of the teacher beams and of the top-K support")
    _deprecated(p, "--align-topk", "--align-top-k", "align_top_k", type=int)
    p.add_argument("--name", default=None, help="the draft's name: its folder under DIR/drafts, what --draft of "
                   "the other commands takes (default: the kind)")
    p.add_argument("--list-valid-users", type=int, default=0, metavar="N",
                   help="also score each epoch along the target's greedy lists of N validation users and keep the "
                        "epoch that scores best there (see `padrec list-agreement`)")
    p.add_argument("--list-train-users", type=int, default=0, metavar="N",
                   help="also train on the target's greedy lists for N training users (prompted with a prefix of "
                        "their training items; generated once per target, cached under the run)")
    p.add_argument("--init-from", default=None, metavar="DRAFT",
                   help="start from the weights of this trained feature draft of the run (padrec from its base: "
                        "the module starts as the identity)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation, batch order and validation sample; another seed measures run-to-run spread")
    p.add_argument("--time-budget-min", type=float, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_train_draft)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a draft's acceptance table (slot x margin), for calibrated trees")
    p.add_argument("--run", required=True)
    p.add_argument("--draft", default="eagle")
    p.add_argument("--users", type=int, default=60, help="validation users to decode")
    p.add_argument("--depth", type=int, default=8, help="chain length used while collecting")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_calibrate)


def _add_list_agreement(sub) -> None:
    p = sub.add_parser("list-agreement", help="drafts' agreement with the target along its own greedy lists "
                                              "(the validation that ranks drafts as inference does)")
    p.add_argument("--run", required=True)
    p.add_argument("--drafts", required=True, help="comma-separated draft names of the run")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--steps", type=int, default=6, help="unrolled draft steps (= chain depths) to score")
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--seed", type=int, default=0, help="which users are sampled")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.set_defaults(func=cmd_list_agreement)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="batch-1 latency: autoregressive vs speculative decoding, pair by pair")
    p.add_argument("--run", required=True)
    p.add_argument("--drafts", default="eagle", help="comma-separated draft names of the run")
    p.add_argument("--users", type=int, default=100, help="users to time (beam mode: 0 = every user of the split)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--n-items", type=int, default=10)
    p.add_argument("--chain", default="4", help="comma-separated chain lengths γ")
    p.add_argument("--tree", default="5,4,24",
                   help="DEPTH,TOPK,TOTAL[,cal]; several separated by ';' (cal: scored by calibrated acceptance)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive AR decoder (a call per token)")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the Hugging Face rows (generate, assisted generation, prompt lookup)")
    p.add_argument("--prompt-lookup", type=int, default=10,
                   help="tokens HF prompt-lookup decoding copies per round (0: no such row)")
    p.add_argument("--out", default=None, help="JSON path (default DIR/results/bench.json)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU (target and drafts)")
    p.add_argument("--mode", default="list", choices=["list", "beam"],
                   help="list: list-wise greedy SD (the flags above); beam: speculative top-K beam search (below)")
    p.add_argument("--beam-k", default="10", help="beam: comma-separated K (beam width = list length)")
    p.add_argument("--draft-beams", default="40", help="beam: comma-separated N, the draft's beam width (>= K)")
    p.add_argument("--gamma", default="3", help="beam: comma-separated drafted levels per round")
    p.add_argument("--verify", default="strict,relaxed", help="beam: strict (lossless) and/or relaxed (AtSpeed-R)")
    p.add_argument("--relaxed-temperature", default="1", help="beam: comma-separated sampling temperatures (relaxed)")
    p.set_defaults(func=cmd_bench)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: the shipped Beauty model's quality beside the baselines and its "
                                    "speed (minutes); --from-scratch: tokenize, train, evaluate, benchmark (15 min)")
    p.add_argument("--zoo", default="beauty", help="the shipped model to show (see `padrec zoo list`)")
    p.add_argument("--users", type=int, default=300, help="test users decoded live (the zoo demo)")
    p.add_argument("--bench-users", type=int, default=20, help="test users of the speed table (the zoo demo)")
    p.add_argument("--from-scratch", action="store_true", help="run the whole pipeline here instead")
    p.add_argument("--dataset", default="beauty", help="--from-scratch: the dataset")
    p.add_argument("--preset", default="small", help="--from-scratch: the target preset")
    p.add_argument("--out", default="runs/demo", help="--from-scratch: the run directory")
    p.add_argument("--time-budget-min", type=float, default=None, help="--from-scratch: training time budget")
    p.add_argument("--quick", action="store_true", help="--from-scratch: a ~3 minute version (tiny budget, 500 users)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_demo)


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="trained models shipped in the repository: list, copy, pack (use one with "
                                   "--run zoo:NAME in any command)")
    zsub = p.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="the shipped models with their test quality and speed")
    q = zsub.add_parser("copy", help="a verified copy of a shipped model as a run directory")
    q.add_argument("name")
    q.add_argument("dir")
    q = zsub.add_parser("pack", help="store a trained run in the zoo (16-bit weights where no decoded list changes, "
                                     "test evaluation, manifest with sha256 of every file)")
    q.add_argument("--run", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("--drafts", default=None, help="drafts to ship, comma separated (default: all of the run's)")
    q.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    q.add_argument("--check-users", type=int, default=1000,
                   help="test users whose beam-20 / list-10 lists must be unchanged in 16 bits (0: all)")
    q.add_argument("--description", default="")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.add_argument("--made-by", action="append", default=[], help="a command that made the run (repeatable)")
    q.add_argument("--baselines-file", default="benchmarks/results/baselines.json",
                   help="committed baseline results, shown where none are trained under runs/baselines")
    q = zsub.add_parser("add-bench", help="record a `padrec bench` result of a zoo model's copy in its manifest")
    q.add_argument("name")
    q.add_argument("bench", help="the bench JSON (run on --run zoo:NAME)")
    p.set_defaults(func=cmd_zoo)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP recommendation service: POST /recommend, GET /info, GET /health")
    p.add_argument("--run", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the model thread (per replica)")
    p.add_argument("--max-history", type=int, default=200, help="longest history a request may send")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    p.add_argument("--max-batch", type=int, default=1,
                   help="micro-batching: decode up to N queued greedy AR requests together (faster under load; "
                        "float32 near-ties may then differ from the batch-1 answer); 1: off")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted, 413 beyond (default: room for --max-history long ids)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (pip install 'padrec[ray]')")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: number of replicas")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="padrec", description="Fast LLM-based generative recommendation.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    _add_data(sub)
    _add_tokenize(sub)
    _add_import_model(sub)
    _add_train_target(sub)
    _add_evaluate(sub)
    _add_baseline(sub)
    _add_recommend(sub)
    _add_train_draft(sub)
    _add_calibrate(sub)
    _add_list_agreement(sub)
    _add_bench(sub)
    _add_parity(sub)
    _add_demo(sub)
    _add_serve(sub)
    _add_zoo(sub)
    return ap


# Commands that share their work over the ranks of `torchrun --nproc_per_node=N -m padrec ...`.
DISTRIBUTED_COMMANDS = ("train-target", "train-draft", "evaluate", "recommend")


def _join_process_group(cmd: str) -> bool:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if cmd not in DISTRIBUTED_COMMANDS:
        raise PadrecError(f"`padrec {cmd}` runs in one process; under torchrun only "
                          f"{', '.join(DISTRIBUTED_COMMANDS)} share their work over ranks")
    from padrec.training import distributed as dist

    return dist.init_from_env()


def _resolve_zoo_run(args) -> None:
    """--run zoo:NAME: the verified working copy of a shipped model, so commands read and write a plain folder."""
    from padrec import zoo

    run = getattr(args, "run", None)
    if not (isinstance(run, str) and run.startswith(zoo.PREFIX)) or args.cmd == "zoo":
        return
    if args.cmd == "tokenize":
        raise PadrecError("tokenize creates a run directory; a zoo model has its semantic IDs already "
                          "(`padrec zoo copy NAME DIR` gives you a run directory to change)")
    args.run = str(zoo.resolve_run(run))


def _exit_now(code: int) -> None:
    """End a torchrun rank without the interpreter's teardown. About once in 30 runs a rank aborted there, after
    its work was done and the group destroyed (`terminate called without an active exception`: a native thread
    still joinable when C++ static destructors ran), so torchrun reported a finished run as failed. Every result
    is written atomically before this point, so skipping the teardown loses nothing."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # what produced a result file: recorded in the JSON that bench writes
    args.command_line = "padrec " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        _resolve_zoo_run(args)
        grouped = _join_process_group(args.cmd)
        args.func(args)
        if grouped:  # only on success: on an error torchrun stops the other ranks, which may sit in a collective
            from padrec.training import distributed as dist

            dist.cleanup()
            _exit_now(0)
    except PadrecError as e:
        print(f"padrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("padrec: interrupted (checkpoints written so far are intact; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
