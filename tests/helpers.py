"""Helpers shared by test modules (pytest puts tests/ on sys.path, so `from helpers import ...` works)."""

from __future__ import annotations

import torch


def perturb(model, seed: int, scale: float = 0.3):
    """Non-trivial random weights for a freshly built draft (the default init keeps the decoder layer near the
    identity and new embeddings near 0, which would make many tests pass vacuously). Frozen weights (the target's
    LM head, frozen embeddings) stay as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()
