"""Multi-step ("training-time test") unrolling of a feature-level draft, HASS-style.

At inference a draft node at depth d is fed the draft's *own* feature from depth d-1 and attends to the committed
context (keys computed from target features) plus its d-1 speculative ancestors. Plain EAGLE training only ever
shows the draft target features, so deeper nodes see inputs unlike anything in training. Unrolling J steps
reproduces inference exactly, for every position of a training sequence at once:

    step 1:  input (x_i, f_{i-1})          f from the target             depth 0
    step j:  input (x_i, f̂^{(j-1)}_{i-1})  the draft's step j-1 output   depth j-1

Query (step j, position i) attends to step-1 keys of positions p <= i-(j-1) (the committed context) and to the
step-s key of position p = i-(j-s) for s = 2..j (its speculative ancestors, itself included). Keys of earlier
steps live in one growing KV cache, so step j is a single forward with one additive mask [B, 1, T, j*T]; there is
no loop over positions. `step_mask_reference` builds the same mask position by position, for the tests.

The step-(j-1) features fed to step j are detached: gradients reach earlier steps only through the attention
keys, which keeps the unrolled backward as cheap as J independent steps.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from padrec.drafts.slots import slots_of


def step_mask(pad_mask: torch.Tensor, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [B, 1, T, step*T] for the queries of unrolled step `step` (1-based)."""
    B, T = pad_mask.shape
    i = torch.arange(T, device=pad_mask.device)[:, None]
    p = torch.arange(T, device=pad_mask.device)[None, :]
    blocks = [p <= i - (step - 1)]  # step 1: the committed context
    blocks += [p == i - (step - s) for s in range(2, step + 1)]  # step s: the ancestor at distance step-s
    allowed = torch.cat(blocks, dim=1)[None, None] & pad_mask.bool().repeat(1, step)[:, None, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=pad_mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def step_mask_reference(pad_mask: torch.Tensor, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same mask built position by position, from the inference picture (tests only)."""
    B, T = pad_mask.shape
    out = torch.full((B, 1, T, step * T), torch.finfo(dtype).min, dtype=dtype)
    for b in range(B):
        for i in range(T):
            depth = step - 1  # query i plays a node at this depth; its chain starts right after position i-depth
            for p in range(0, i - depth + 1):  # committed context
                if pad_mask[b, p]:
                    out[b, 0, i, p] = 0.0
            for d in range(1, depth + 1):  # ancestors at depth d sit at position i-depth+d, in step d+1's block
                p = i - depth + d
                if 0 <= p and pad_mask[b, p]:
                    out[b, 0, i, d * T + p] = 0.0
    return out


def unrolled_features(model, input_ids: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor,
                      steps: int) -> list[torch.Tensor]:
    """Predicted features [B, T, d] of each unrolled step. `features[:, i]` is the target feature before token i
    (zero before BOS), as in `EagleDraftModel.forward`."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    slots = slots_of(input_ids, model.levels, model.sid_end) if model.needs_slots else None
    cache = DynamicCache()
    outs, feats = [], features
    for j in range(1, steps + 1):
        mask = step_mask(attention_mask, j, dtype=model.fc.weight.dtype)
        depths = torch.full((B, T), j - 1, dtype=torch.long, device=input_ids.device)
        out = model(input_ids, feats, attention_mask=mask, position_ids=pos, cache=cache, slots=slots,
                    depths=depths)
        outs.append(out)
        if j < steps:
            feats = torch.zeros_like(out)
            feats[:, 1:] = out[:, :-1].detach()
    return outs
