"""Training a draft for a run's target: a feature-level head — EAGLE (`kind="eagle"`), the same head trained
with J unrolled steps (`"hass"`, drafts/hass.py), or PAD-Rec (`"padrec"`: the head plus item-slot and draft-step
embeddings, trained like its base, `padrec_base="eagle"|"hass"`) — or an independent small LM distilled from the
target (`kind="lm"`).

Both learn from the target's last hidden states H over the same training windows the target saw (SID-token
positions only). H is computed under no_grad during the first epoch and kept in memory (float16, per example)
when it fits `feature_cache_mb`: on CPU the target forward costs about as much as a whole draft step, so later
epochs run ~2x faster. The target's soft labels are `lm_head(H)` (checked once against the target's logits).

Per epoch: validation on the valid split's next item (teacher forcing) reporting the loss and the top-1
agreement of the draft with the target (the acceptance proxy), per SID level and, for feature-level drafts, per
unrolled step (`VALID_STEPS` at least, whatever the training unroll: step j is how the draft does at tree depth
j-1). With `list_valid_users` the draft is also scored along the target's own greedy lists (`target_lists.py`),
the validation that ranks drafts as inference does. The best epoch (by the agreement averaged over steps: along
the lists when they are scored) goes to `runs/<run>/drafts/<name>/`, every epoch to `drafts/.<name>.last/` for
resuming.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.decoding.trie import ItemTrie
from padrec.drafts.alignment import BeamAligner
from padrec.drafts.eagle_model import EagleDraftModel
from padrec.drafts.lm_draft import LMDraftConfig, build_lm_draft
from padrec.drafts.objective import (
    TargetFeatures,
    _positions,
    check_head_on_features,
    draft_loss,
    validate,
)
from padrec.drafts.padrec import PadRecDraftModel, PositionConfig
from padrec.drafts.registry import (
    FEATURE_KINDS,
    draft_dir,
    last_dir,
    load_draft_weights,
    read_draft_meta,
    save_draft_dir,
    target_identity,
)
from padrec.drafts.target_lists import greedy_list_examples, train_list_examples
from padrec.drafts.train_config import DraftTrainConfig
from padrec.training import distributed as dist
from padrec.training.schedule import stop_reason, warmup_cosine_lr
from padrec.training.sequences import (
    collate,
    length_bucketed_batches,
    run_examples,
)


def _new_model(kind: str, target, vocab_size: int, cfg: DraftTrainConfig, levels: int):
    if kind == "padrec":
        position = PositionConfig(levels=levels, ipe=cfg.ipe, spe=cfg.spe, gate=cfg.gate,
                                  learn_alpha=cfg.learn_alpha, trained_depths=cfg.steps)
        model = PadRecDraftModel.from_target(target, position, cfg.eagle_intermediate, cfg.freeze_embed,
                                             seed=cfg.seed)
        return model, model.model_config()
    if kind in FEATURE_KINDS:
        model = EagleDraftModel.from_target(target, cfg.eagle_intermediate, cfg.freeze_embed, seed=cfg.seed)
        return model, model.model_config()
    mc = LMDraftConfig(vocab_size, cfg.lm_layers, cfg.lm_hidden, cfg.lm_heads, cfg.lm_intermediate)
    return build_lm_draft(mc, seed=cfg.seed), mc.to_dict()


def _warm_start(run, model, source: str, identity: dict) -> dict:
    """Copy the weights of the run's trained draft `source` into `model`; returns what the new draft's metadata
    records about where it started. Only a PAD-Rec module may be missing from the source (it then starts as the
    identity map); anything else that does not match is an error, never a silent partial load."""
    path = draft_dir(run, source)
    meta = read_draft_meta(path)
    if meta.get("identity") != identity:
        raise PadrecError(f"draft {source!r} was trained for another target than this run's; cannot start from it")
    if meta["kind"] not in FEATURE_KINDS:
        raise PadrecError(f"draft {source!r} is a {meta['kind']!r} draft; a warm start needs a feature draft")
    state = load_draft_weights(path, meta).state_dict()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another draft architecture
        raise PadrecError(f"draft {source!r} does not fit the new draft: {e}") from e
    if unexpected or any(not k.startswith("position.") for k in missing):
        raise PadrecError(f"draft {source!r} does not fit the new draft (missing {sorted(missing)}, "
                          f"unexpected {sorted(unexpected)})")
    if missing:
        model.position.start_as_identity()
    return {"draft": source, "kind": meta["kind"], "files": meta.get("files")}


def train_draft(run, cfg: DraftTrainConfig, resume: bool = True, progress: bool = True,
                feature_pool: dict | None = None) -> dict:
    """Train (or resume training of) a draft for the run's target. Returns the history and where it was saved.

    `feature_pool`: a dict shared by several calls in one process (a study training many drafts of one run):
    the target, the examples and the cached target features are computed once and reused."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = dist.world_size()
    progress = progress and dist.is_main()
    name = cfg.draft_name
    best_path, last_path = draft_dir(run, name), last_dir(run, name)
    identity = target_identity(run)
    pool_key = (str(run.path), identity["target_hash"], cfg.seed, cfg.max_valid_cases, cfg.max_train_examples,
                cfg.feature_cache_mb, cfg.list_train_users)
    if feature_pool is not None and pool_key in feature_pool:
        target, train_examples, valid_examples, train_feats, valid_feats = feature_pool[pool_key]
    else:
        target = run.load_target()
        target.eval()
        for p in target.parameters():
            p.requires_grad_(False)
        if identity["target_hidden_size"] != target.config.get_text_config().hidden_size:
            raise PadrecError(f"target config.json and the loaded target disagree on the hidden size ({run.target_dir})")
        train_examples, valid_examples = run_examples(run, cfg.max_valid_cases, cfg.seed)
        if cfg.max_train_examples and len(train_examples) > cfg.max_train_examples:
            train_examples = random.Random(cfg.seed).sample(train_examples, cfg.max_train_examples)
        if cfg.list_train_users:
            train_examples = train_examples + train_list_examples(run, target, cfg.list_train_users, seed=cfg.seed,
                                                                  progress=progress)
        valid_examples = dist.shard(valid_examples)  # under torchrun each rank validates its share
        check_head_on_features(target, collate(train_examples[: min(8, len(train_examples))]))
        train_feats = TargetFeatures(target, train_examples, cfg.feature_cache_mb)
        valid_feats = TargetFeatures(target, valid_examples, cfg.feature_cache_mb)
        if feature_pool is not None:
            feature_pool[pool_key] = (target, train_examples, valid_examples, train_feats, valid_feats)
    head = target.get_output_embeddings()
    list_examples = list_feats = None
    if cfg.list_valid_users:
        list_examples = dist.shard(greedy_list_examples(run, target, "valid", cfg.list_valid_users, seed=cfg.seed))
        list_feats = TargetFeatures(target, list_examples, cfg.feature_cache_mb)
    aligner = None
    if cfg.align:
        aligner = BeamAligner(target, ItemTrie(run.sids.all_item_tokens()), train_examples, cfg.align,
                              cfg.align_topk, cfg.align_examples, cfg.seed)
    lengths = [len(ids) for ids, _ in train_examples]
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    state, started_from = None, None
    if resume and (last_path / "train_state.pt").is_file():
        meta = read_draft_meta(last_path)
        # a field added to the config since that run was saved counts as its default
        if {**asdict(DraftTrainConfig()), **meta.get("config", {})} != asdict(cfg):
            raise PadrecError(f"{last_path} holds an interrupted draft training with different settings; "
                              "pass the same settings to resume, or resume=False (--no-resume) to start over")
        if meta.get("identity") != identity:
            raise PadrecError(f"{last_path} holds an interrupted draft training for another target; "
                              "start over with resume=False (--no-resume)")
        model = load_draft_weights(last_path, meta)
        model_config = meta["model_config"]
        state = torch.load(last_path / "train_state.pt", weights_only=True)
        history = json.loads(state["history_json"])
        started_from = meta.get("started_from")
        start_epoch = int(state["epoch"]) + 1
    else:
        model, model_config = _new_model(cfg.kind, target, identity["vocab_size"], cfg, run.sids.vocab.levels)
        history, start_epoch = [], 0
        if cfg.init_from is not None:
            started_from = _warm_start(run, model, cfg.init_from, identity)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    n_params = sum(p.numel() for p in params)

    best = max((h.get("valid_score", h["valid_agreement"]) for h in history), default=-1.0)
    bad_epochs = 0
    for h in history:
        bad_epochs = 0 if h["improved"] else bad_epochs + 1
    stopped = history[-1].get("stop_reason") if history else None
    base_meta = {"kind": cfg.kind, "name": name, "config": asdict(cfg), "model_config": model_config,
                 "identity": identity, "n_trainable_params": n_params,
                 **({"started_from": started_from} if started_from else {})}

    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        t0 = time.time()
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        run_loss, run_n, tokens = 0.0, 0, 0
        for b, idx in enumerate(bar):
            step = epoch * steps_per_epoch + b
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, total_steps, cfg.lr, cfg.warmup_steps)
            mine = dist.shard(idx)  # under torchrun: this rank's part of the same global batch
            batch = collate([train_examples[i] for i in mine]) if mine else None
            n_local = int(_positions(batch).sum()) if mine else 0
            n_global = int(dist.all_reduce_sum([n_local])[0]) if world > 1 else n_local
            if n_global == 0:
                continue
            opt.zero_grad(set_to_none=True)
            if n_local:
                loss, _, _ = draft_loss(cfg.kind, model, head, batch, train_feats(mine, batch), cfg)
                if aligner is not None:
                    loss = loss + cfg.align_weight * aligner.loss(cfg.kind, model, head, mine, cfg)
                # the losses are means over this rank's positions: weighted by its share, the ranks' gradients
                # sum to the gradient of the global batch's mean
                (loss * (n_local / n_global) if world > 1 else loss).backward()
            else:  # nothing here this step, but the gradient sum below needs this rank's (zero) part
                loss = torch.zeros(())
                sum(p.sum() for p in params).mul(0.0).backward()
            dist.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            run_loss += loss.item() * n_local  # position-weighted: the same epoch mean however batches are split
            run_n += n_local
            tokens += int(batch["attention_mask"].sum()) if mine else 0
            if b % 20 == 0:
                bar.set_postfix(loss=f"{run_loss / max(1, run_n):.4f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        val = validate(cfg.kind, model, head, valid_examples, valid_feats, cfg, run.sids.vocab.levels)
        if list_examples is not None:
            lv = validate(cfg.kind, model, head, list_examples, list_feats, cfg, run.sids.vocab.levels)
            val.update(list_agreement_by_step=lv["valid_agreement_by_step"],
                       list_agreement_per_level=lv["valid_agreement_per_level"], valid_score=lv["valid_score"])
        seconds = time.time() - t0
        if world > 1:  # the slowest rank's time (every rank must agree on a time-budget stop) and the global mean
            seconds = dist.all_reduce_max(seconds)
            run_loss, run_n, tokens = dist.all_reduce_sum([run_loss, run_n, tokens])
        improved = val["valid_score"] > best + 1e-6
        bad_epochs = 0 if improved else bad_epochs + 1
        elapsed = sum(h["seconds"] for h in history) + seconds
        reason = stop_reason(bad_epochs, cfg.patience, elapsed, cfg.time_budget_min)
        entry = {"epoch": epoch + 1, "train_loss": run_loss / max(1, run_n), **val, "improved": improved,
                 "seconds": seconds, "tokens_per_s": tokens / seconds, "features_cached": train_feats.enabled,
                 "stop_reason": reason}
        history.append(entry)
        if progress:
            tqdm.write(
                f"{name} epoch {epoch + 1}: train {entry['train_loss']:.4f}  valid {val['valid_loss']:.4f}  "
                f"agree {'/'.join(f'{a:.3f}' for a in val['valid_agreement_by_step'])}"
                + (f"  lists {'/'.join(f'{a:.3f}' for a in val['list_agreement_by_step'])}"
                   if list_examples is not None else "")
                + f"{'  *best*' if improved else ''}  ({seconds:.0f}s)"
                + (f"  stop: {reason}" if reason else "")
            )
        meta = {**base_meta, "epoch": epoch + 1, "history": history}
        if improved:
            best = val["valid_score"]
        if dist.is_main():  # every rank holds the same weights; one writes them
            if improved:
                save_draft_dir(best_path, model.state_dict(), {**meta, **val})
            train_state = {"optimizer": opt.state_dict(), "epoch": epoch, "history_json": json.dumps(history)}
            save_draft_dir(last_path, model.state_dict(), meta, train_state=train_state)
        dist.barrier()
        stopped = reason

    if not best_path.exists():
        raise PadrecError("draft training produced no checkpoint (zero epochs?)")
    return {"history": history, "n_params": n_params, "train_seconds": sum(h["seconds"] for h in history),
            "path": str(best_path), "name": name}
