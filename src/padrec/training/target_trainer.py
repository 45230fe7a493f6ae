"""Training the target LM on users' chronological item sequences, with validation-based early stopping
and resume after interruption."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.models.checkpoint import load_checkpoint, load_train_state, read_meta, save_checkpoint
from padrec.models.target import build_target, get_preset, preset_dict
from padrec.run import Run
from padrec.tokenizer.semantic_ids import atomic_write_text
from padrec.training.schedule import stop_reason, warmup_cosine_lr
from padrec.training.sequences import collate, length_bucketed_batches, run_examples


@dataclass
class TrainConfig:
    preset: str = "small"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    patience: int = 3  # epochs without validation improvement before stopping
    max_valid_cases: int = 3000
    # With a budget, the epoch count is planned from the first epoch's duration so the cosine schedule decays
    # fully within the budget; training also stops after any epoch that crosses it.
    time_budget_min: float | None = None
    seed: int = 0
    threads: int | None = None
    base_model: str | None = None  # a local HF causal-LM checkpoint to fine-tune instead of a preset


@torch.inference_mode()
def validation_loss(model, examples, batch_size: int = 128) -> float:
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s : s + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += (labels != -100).sum().item()
    return total / max(1, count)


def _new_model(run: Run, cfg: TrainConfig):
    if cfg.base_model:
        from padrec.models.target import adapt_base_model

        return adapt_base_model(cfg.base_model, run.sids.vocab.size, seed=cfg.seed)
    return build_target(run.sids.vocab.size, cfg.preset, seed=cfg.seed)


def train_target(run: Run, cfg: TrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume training of) the run's target. Returns the training history."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.base_model:
        get_preset(cfg.preset)  # an unknown preset is the error to report, not a resume mismatch
    train_examples, valid_examples = run_examples(run, cfg.max_valid_cases, cfg.seed)
    lengths = [len(ids) for ids, _ in train_examples]
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    planned_epochs = cfg.epochs

    identity = {**run.checkpoint_identity(), "train_config": asdict(cfg)}
    state = load_train_state(run.target_last_dir) if resume and run.target_last_dir.exists() else None
    if state is not None:
        meta = read_meta(run.target_last_dir)
        if meta.get("train_config") != asdict(cfg):
            raise PadrecError(
                f"{run.target_last_dir} holds an interrupted run with different settings; "
                "pass the same settings to resume, or --no-resume to start over"
            )
        model, _ = load_checkpoint(run.target_last_dir, expect=run.checkpoint_identity())
        history = json.loads(state["history_json"])
        start_epoch = int(state["epoch"]) + 1
    else:
        model, history, start_epoch = _new_model(run, cfg), [], 0

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    best = min((h["valid_loss"] for h in history), default=float("inf"))
    bad_epochs = 0
    for h in history:  # recount patience so a resumed run stops where an uninterrupted one would
        bad_epochs = 0 if h["improved"] else bad_epochs + 1
    stopped = history[-1].get("stop_reason") if history else None
    if history:
        planned_epochs = history[0].get("planned_epochs", cfg.epochs)
    n_params = sum(p.numel() for p in model.parameters())

    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        t0 = time.time()
        model.train()
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        run_loss, run_n, tokens = 0.0, 0, 0
        for b, idx in enumerate(bar):
            step = epoch * steps_per_epoch + b
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, steps_per_epoch * planned_epochs, cfg.lr, cfg.warmup_steps)
            batch = collate([train_examples[i] for i in idx])
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run_loss += loss.item()
            run_n += 1
            tokens += int(batch["attention_mask"].sum())
            if b % 20 == 0:
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        vloss = validation_loss(model, valid_examples)
        seconds = time.time() - t0
        improved = vloss < best - 1e-4
        bad_epochs = 0 if improved else bad_epochs + 1
        elapsed = sum(h["seconds"] for h in history) + seconds
        if epoch == 0 and cfg.time_budget_min is not None:
            planned_epochs = min(cfg.epochs, max(2, int(cfg.time_budget_min * 60 // seconds)))
        reason = stop_reason(bad_epochs, cfg.patience, elapsed, cfg.time_budget_min)
        if reason is None and epoch + 1 >= planned_epochs:
            reason = f"planned {planned_epochs} epochs done"
        entry = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(1, run_n),
            "valid_loss": vloss,
            "improved": improved,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "stop_reason": reason,
            "planned_epochs": planned_epochs,
        }
        history.append(entry)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: train {entry['train_loss']:.4f}  valid {vloss:.4f}"
                f"{'  *best*' if improved else ''}  ({seconds:.0f}s, {entry['tokens_per_s']:.0f} tok/s)"
                + (f"  stop: {reason}" if reason else "")
            )
        meta = {**identity, "preset": preset_dict(cfg.preset) if not cfg.base_model else None, "n_params": n_params}
        if improved:
            best = vloss
            save_checkpoint(model, run.target_dir, {**meta, "epoch": epoch + 1, "valid_loss": vloss})
        train_state = {"optimizer": opt.state_dict(), "epoch": epoch, "history_json": json.dumps(history)}
        save_checkpoint(model, run.target_last_dir, meta, extra_tensors=train_state)
        atomic_write_text(run.path / "train_history.json", json.dumps(history, indent=2))
        stopped = reason

    if not run.target_dir.exists():
        raise PadrecError("training produced no checkpoint (zero epochs?)")
    return {"history": history, "n_params": n_params, "train_seconds": sum(h["seconds"] for h in history)}
