"""Training the target LM on users' chronological item sequences, with validation-based early stopping
and resume after interruption."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.files import atomic_write_text
from padrec.models.checkpoint import (
    load_checkpoint,
    load_train_state,
    read_meta,
    recover_dir,
    save_checkpoint,
)
from padrec.models.target import adapt_base_model, build_target, get_preset, preset_dict
from padrec.run import Run
from padrec.training import distributed as dist
from padrec.training.schedule import stop_reason, warmup_cosine_lr
from padrec.training.sequences import (
    IGNORE,
    collate,
    length_bucketed_batches,
    run_examples,
)


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


def validation_loss(model, examples, batch_size: int = 128) -> float:
    total, count = validation_sums(model, examples, batch_size)
    return total / max(1, count)


@torch.inference_mode()
def validation_sums(model, examples, batch_size: int = 128) -> tuple[float, int]:
    """Summed token loss and token count over `examples` (sums, so ranks' shares can be added up)."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(dev) for k, v in collate(examples[s : s + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += (labels != -100).sum().item()
    return total, count


def _label_tokens(example) -> int:
    return sum(1 for t in example[1][1:] if t != IGNORE)  # the first label is never predicted (shifted loss)


def _shard_step(net, examples, dev: torch.device) -> tuple[torch.Tensor, float, int, int]:
    """Forward this rank's shard of one global batch. Returns the loss to backpropagate, the shard's summed
    token loss, its label tokens and its input tokens.

    DDP averages gradients over the W ranks, so each rank backpropagates sum(own token losses) * W / N, with N
    the label tokens of the whole global batch (every rank holds the full batch list and counts N itself): the
    averaged gradient is then exactly that of the global batch's mean token loss, the 1-process loss, however
    unevenly the tokens fall on the ranks. A rank whose shard is empty (a global batch smaller than W) still
    has to join the gradient all-reduce, so it runs one example with zero weight.
    """
    n_global = max(1, sum(_label_tokens(e) for e in examples))
    mine = dist.shard(examples)
    weight = dist.world_size() / n_global if mine else 0.0
    batch = {k: v.to(dev) for k, v in collate(mine or examples[:1]).items()}
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    if not mine:
        return loss_sum * weight, 0.0, 0, 0
    return loss_sum * weight, loss_sum.item(), sum(_label_tokens(e) for e in mine), int(batch["attention_mask"].sum())


def _new_model(run: Run, cfg: TrainConfig):
    if cfg.base_model:
        return adapt_base_model(cfg.base_model, run.sids.vocab.size, seed=cfg.seed)
    return build_target(run.sids.vocab.size, cfg.preset, seed=cfg.seed)


def train_target(run: Run, cfg: TrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume training of) the run's target. Returns the training history.

    Under torchrun (see `padrec.training.distributed`) every rank builds the same global batches and trains on
    its shard of each; the result equals a 1-process run with the same batch size up to float rounding. Rank 0
    alone writes checkpoints and the history and prints progress; the other ranks wait for it at a barrier.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = dist.world_size()
    progress = progress and dist.is_main()
    if not cfg.base_model:
        get_preset(cfg.preset)  # an unknown preset is the error to report, not a resume mismatch
    train_examples, valid_examples = run_examples(run, cfg.max_valid_cases, cfg.seed)
    lengths = [len(ids) for ids, _ in train_examples]
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    planned_epochs = cfg.epochs

    identity = {**run.checkpoint_identity(), "train_config": asdict(cfg)}
    if dist.is_main():  # a killed run may have left a checkpoint swap halfway; only the writer repairs it
        recover_dir(run.target_dir)
        recover_dir(run.target_last_dir)
        for tmp in run.path.glob(".train_history.json.*.tmp"):  # atomic_write_text's, of a killed write
            tmp.unlink(missing_ok=True)
    dist.barrier()
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
        if progress:
            tqdm.write(f"resuming from {run.target_last_dir}: {start_epoch} epoch(s) done")
    else:
        model, history, start_epoch = _new_model(run, cfg), [], 0

    dev = dist.device()
    model.to(dev)
    net = dist.wrap_model(model)  # `model` stays the plain module: it is what gets validated and saved
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
        net.train()
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        run_loss, run_n, tokens = 0.0, 0, 0
        shard_sums, batch_tokens = [], []  # distributed: per global batch, this rank's loss sum / label tokens
        for b, idx in enumerate(bar):
            step = epoch * steps_per_epoch + b
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, steps_per_epoch * planned_epochs, cfg.lr, cfg.warmup_steps)
            examples = [train_examples[i] for i in idx]
            if world == 1:
                batch = collate(examples)
                loss = model(**batch).loss
                batch_loss, n_tok = loss.item(), int(batch["attention_mask"].sum())
            else:
                loss, shard_sum, shard_labels, n_tok = _shard_step(net, examples, dev)
                shard_sums.append(shard_sum)
                batch_tokens.append(max(1, sum(_label_tokens(e) for e in examples)))
                batch_loss = shard_sum / max(1, shard_labels)  # the bar shows rank 0's shard only
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run_loss += batch_loss
            run_n += 1
            tokens += n_tok
            if b % 20 == 0:
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        if world == 1:
            vloss = validation_loss(model, valid_examples)
        else:
            *sums, tokens = dist.all_reduce_sum([*shard_sums, tokens])
            run_loss = sum(s / n for s, n in zip(sums, batch_tokens))
            total, count = dist.all_reduce_sum(validation_sums(model, dist.shard(valid_examples)))
            vloss = total / max(1, count)
        seconds = time.time() - t0
        if world > 1:  # every rank must take the same time-budget decisions: use the slowest rank's time
            seconds = dist.all_reduce_max(seconds)
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
        if dist.is_main():
            if improved:
                save_checkpoint(model, run.target_dir, {**meta, "epoch": epoch + 1, "valid_loss": vloss})
            train_state = {"optimizer": opt.state_dict(), "epoch": epoch, "history_json": json.dumps(history)}
            save_checkpoint(model, run.target_last_dir, {**meta, "epoch": epoch + 1}, extra_tensors=train_state)
            atomic_write_text(run.path / "train_history.json", json.dumps(history, indent=2))
        dist.barrier()
        stopped = reason

    if not run.target_dir.exists():
        raise PadrecError("training produced no checkpoint (zero epochs?)")
    return {"history": history, "n_params": n_params, "train_seconds": sum(h["seconds"] for h in history)}
