"""Learning-rate schedule and stopping rule shared by the target and draft trainers."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `lr` at step `total`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def stop_reason(bad_epochs: int, patience: int, elapsed_s: float, budget_min: float | None) -> str | None:
    """Why training stops after this epoch (early stopping, then the time budget), or None to go on."""
    if bad_epochs >= patience:
        return f"no validation improvement for {patience} epochs"
    if budget_min is not None and elapsed_s > budget_min * 60:
        return f"time budget of {budget_min} min reached"
    return None
