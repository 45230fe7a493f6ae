"""The training loop that the target and every draft share: batching, schedule, clipping, the multi-process rule,
validation, early stopping, the time budget, best/last checkpoints and resume.

What differs between them is a `TrainTask`: how one global batch's loss is computed on this rank, how an epoch is
validated and scored, and what is saved. The loop itself is the same for all:

    for each epoch: length-bucketed batches (seeded by seed and epoch), for each batch: warm-up + cosine lr,
    this rank's loss, backward, gradients summed over the ranks, clip to norm 1, AdamW step; then validate,
    score, patience / budget / planned-epochs stop rule, history entry, rank 0 saves best and last, barrier.

One multi-process rule (under torchrun, `training.distributed`): every rank builds the same global batches and
computes the loss of its contiguous share, weighted so that the *sum* of the ranks' gradients is the gradient of
the global batch's mean (`TrainTask.step` does the weighting); the loop sums the gradients. A rank with an empty
share still backpropagates a zero loss over every parameter, so each all-reduce sees every rank.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from padrec.training import distributed as dist
from padrec.training.schedule import stop_reason, warmup_cosine_lr
from padrec.training.sequences import length_bucketed_batches


@dataclass
class LoopConfig:
    """The loop's settings, with the target's defaults; `TrainConfig` (target) and `DraftTrainConfig` (drafts,
    which set some of their own) extend it."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    patience: int = 3  # epochs without validation improvement before stopping
    max_valid_cases: int = 3000
    # stop after the epoch that crosses this budget; a task that plans its epochs (the target) also sizes the
    # epoch count from the first epoch's duration, so the cosine schedule decays fully within the budget
    time_budget_min: float | None = None
    seed: int = 0
    threads: int | None = None


@dataclass
class Step:
    """One global batch on this rank: the loss to backpropagate, and what the epoch's train loss adds up
    (`record_sum / record_n` over the epoch and the ranks) and the input tokens it read."""

    loss: torch.Tensor
    record_sum: float
    record_n: float
    tokens: int


@dataclass
class Resumed:
    """Where an interrupted training continues: its history, the next epoch, the optimizer state and torch's random
    state (dropout draws from it: without it a resumed run would not retrace the uninterrupted one)."""

    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    optimizer: dict | None = None
    rng: torch.Tensor | None = None

    @classmethod
    def from_state(cls, state: dict) -> "Resumed":
        """From a saved train_state (states saved before the random state was kept have none)."""
        return cls(json.loads(state["history_json"]), int(state["epoch"]) + 1, state["optimizer"], state.get("rng"))


class TrainTask:
    """What the loop trains. Subclasses set the attributes and implement the methods."""

    model: torch.nn.Module  # validated and saved
    params: list[torch.nn.Parameter]  # what the optimizer updates
    lengths: list[int]  # of the training examples, for batching
    label: str = ""  # progress bar prefix
    betas: tuple[float, float] = (0.9, 0.98)
    min_delta: float = 0.0  # an epoch improves when its score beats the best by more than this
    plans_epochs: bool = False  # with a time budget, plan the epoch count (and the lr decay) from epoch 1's time

    def step(self, idx: list[int]) -> Step | None:
        """This rank's loss for the global batch `idx` (None: the global batch has nothing to learn from)."""
        raise NotImplementedError

    def validate(self) -> dict:
        """The epoch's validation metrics (every rank gets the same numbers)."""
        raise NotImplementedError

    def score(self, entry: dict) -> float:
        """Higher is better: how an epoch's history entry ranks (picks the best checkpoint, drives patience)."""
        raise NotImplementedError

    def entry_extra(self) -> dict:
        """Fields the history entry carries after `tokens_per_s`."""
        return {}

    def describe(self, entry: dict) -> str:
        """The epoch's progress line, without the best / seconds / stop suffix."""
        return f"train {entry['train_loss']:.4f}"

    def save(self, epoch: int, history: list[dict], improved: bool, entry: dict, train_state: dict) -> None:
        """Write the best checkpoint (if `improved`) and the last one with `train_state` (rank 0 only)."""
        raise NotImplementedError


def _patience_state(task: TrainTask, history: list[dict]) -> tuple[float, int]:
    """(best score, epochs since it) recounted from the history, so a resumed run stops where an uninterrupted
    one would."""
    best, bad = -math.inf, 0
    for h in history:
        bad = 0 if h["improved"] else bad + 1
        best = max(best, task.score(h))
    return best, bad


def _epoch(task: TrainTask, cfg: LoopConfig, opt, epoch: int, total_steps: int, steps_per_epoch: int,
           progress: bool) -> tuple[float, float, int]:
    """Train one epoch; returns this rank's (record sum, record count, input tokens)."""
    t0 = time.time()
    task.model.train()
    batches = length_bucketed_batches(task.lengths, cfg.batch_size, random.Random(cfg.seed * 1000 + epoch))
    bar = tqdm(batches, desc=f"{task.label}epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
    run_sum, run_n, tokens = 0.0, 0.0, 0
    for b, idx in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(epoch * steps_per_epoch + b, total_steps, cfg.lr, cfg.warmup_steps)
        step = task.step(idx)
        if step is None:
            continue
        opt.zero_grad(set_to_none=True)
        step.loss.backward()
        dist.sum_gradients(task.params)
        torch.nn.utils.clip_grad_norm_(task.params, 1.0)
        opt.step()
        run_sum, run_n, tokens = run_sum + step.record_sum, run_n + step.record_n, tokens + step.tokens
        if b % 20 == 0:
            bar.set_postfix(loss=f"{run_sum / max(1e-12, run_n):.4f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
    return run_sum, run_n, tokens


def run_training(task: TrainTask, cfg: LoopConfig, resumed: Resumed, progress: bool = True) -> list[dict]:
    """Train `task` from `resumed` to the stop rule; returns the whole history."""
    progress = progress and dist.is_main()
    opt = torch.optim.AdamW(task.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=task.betas)
    if resumed.optimizer is not None:
        opt.load_state_dict(resumed.optimizer)
    if resumed.rng is not None:
        torch.set_rng_state(resumed.rng)
    history = list(resumed.history)
    best, bad_epochs = _patience_state(task, history)
    stopped = history[-1].get("stop_reason") if history else None
    planned = history[0].get("planned_epochs", cfg.epochs) if history and task.plans_epochs else cfg.epochs
    steps_per_epoch = math.ceil(len(task.lengths) / cfg.batch_size)
    for epoch in range(resumed.start_epoch, cfg.epochs):
        if stopped:
            break
        t0 = time.time()
        run_sum, run_n, tokens = _epoch(task, cfg, opt, epoch, steps_per_epoch * planned, steps_per_epoch, progress)
        metrics = task.validate()
        seconds = time.time() - t0
        if dist.world_size() > 1:  # the slowest rank's time (every rank must take the same budget decision)
            seconds = dist.all_reduce_max(seconds)
            run_sum, run_n, tokens = dist.all_reduce_sum([run_sum, run_n, tokens])
        if epoch == 0 and task.plans_epochs and cfg.time_budget_min is not None:
            planned = min(cfg.epochs, max(2, int(cfg.time_budget_min * 60 // seconds)))
        entry = {"epoch": epoch + 1, "train_loss": run_sum / max(1e-12, run_n), **metrics}
        improved = task.score(entry) > best + task.min_delta
        bad_epochs = 0 if improved else bad_epochs + 1
        reason = stop_reason(bad_epochs, cfg.patience, sum(h["seconds"] for h in history) + seconds,
                             cfg.time_budget_min)
        if reason is None and task.plans_epochs and epoch + 1 >= planned:
            reason = f"planned {planned} epochs done"
        entry.update(improved=improved, seconds=seconds, tokens_per_s=tokens / seconds, **task.entry_extra(),
                     stop_reason=reason, **({"planned_epochs": planned} if task.plans_epochs else {}))
        history.append(entry)
        if progress:
            tqdm.write(f"{task.label}epoch {epoch + 1}: {task.describe(entry)}{'  *best*' if improved else ''}  "
                       f"({seconds:.0f}s, {entry['tokens_per_s']:.0f} tok/s)" + (f"  stop: {reason}" if reason else ""))
        if improved:
            best = task.score(entry)
        if dist.is_main():  # every rank holds the same weights; one writes them
            state = {"optimizer": opt.state_dict(), "epoch": epoch, "history_json": json.dumps(history),
                     "rng": torch.get_rng_state()}
            task.save(epoch, history, improved, entry, state)
        dist.barrier()
        stopped = reason
    return history
