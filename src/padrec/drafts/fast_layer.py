"""Inference-only execution of an EAGLE draft head (fc -> decoder layer -> LM head) with plain torch ops.

At batch 1 on a CPU the draft's cost is per-op overhead and weight reads: the Hugging Face layer goes through a stack
of nn.Module calls, a DynamicCache that concatenates and crops, a rotary module that recomputes cos/sin on every call
and a separate linear per projection. This module computes the same function from the same weights:

* the weights are gathered once per model (again when any of them changes), in the layout of
  `models/fused_layer.py` (q/k/v as one matrix, a cos/sin table, preallocated key/value buffers), and the token half
  of the fusion layer folded into a per-token table, fc([e; f]) = (W_e e + b) + W_f f, so a node costs one row
  lookup and a d x d product there instead of a concatenation and a d x 2d product.

What differs from the module path is the summation order of some products (the fusion split, the q/k/v fusion,
single-row products where the module had several rows), so logits agree to float32 rounding and are as close to
the float64 result as the module path's (tests/test_fast_draft.py).

The `extra()` hook of the draft model (PAD-Rec's position module) is not re-implemented here: the session calls it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from padrec.drafts.eagle_model import EagleDraftModel
from padrec.models.fused_layer import ROPE_TABLE_MIN, LayerWeights, RopeTable, layer_sources, layer_support, stamp_of

__all__ = ["FastDraftWeights", "fast_weights", "supports_fast_path"]


def supports_fast_path(model) -> str | None:
    """None when `model` (an EagleDraftModel) can run on the fused path; otherwise why not."""
    if not isinstance(model, EagleDraftModel):
        return f"{type(model).__name__} is not an EagleDraftModel"
    # the fused path re-derives fuse/forward/logits from the weights and calls only the extra() hook: a subclass
    # that changes any of the others would be bypassed silently
    changed = [name for name in ("fuse", "forward", "logits")
               if getattr(type(model), name) is not getattr(EagleDraftModel, name)]
    if changed:
        return f"{type(model).__name__} overrides {', '.join(changed)}"
    why = layer_support(getattr(model, "layer", None), getattr(model, "rotary", None))
    if why is not None:
        return f"the draft: {why}"
    if getattr(model.lm_head, "bias", None) is not None:
        return "an LM head with a bias"
    return None


def _sources(model) -> list[torch.Tensor]:
    layer = model.layer
    return [model.embed.weight, model.fc.weight, model.fc.bias, *layer_sources(layer), model.lm_head.weight,
            model.rotary.inv_freq]


class FastDraftWeights(LayerWeights):
    """A snapshot of the draft head's weights in inference layout, plus the RoPE table. Read-only once built; a
    session keeps the snapshot it started with, so a weight update never reaches a session halfway."""

    def __init__(self, model):
        why = supports_fast_path(model)
        if why is not None:
            raise ValueError(f"no fused inference path for this draft: {why}")
        self.stamp = _stamp(model)
        cfg = model.cfg
        super().__init__(model.layer, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        w = model.fc.weight
        self.dtype, self.device = w.dtype, w.device
        with torch.no_grad():
            # fc([e; f]) + b = (W_e e + b) + W_f f: the token half depends on the token only, so it is a table
            # [V, d] read one row per node, and the per-node product shrinks to the feature half
            fc_w = model.fc.weight.detach()
            self.token_proj = F.linear(model.embed.weight.detach(), fc_w[:, : self.d], model.fc.bias.detach())
            self.fc_feat_w = fc_w[:, self.d :].contiguous()
            self.head_w = model.lm_head.weight.detach().clone()
        self.rope = RopeTable(model.rotary, self.head_dim, self.dtype, self.device, int(cfg.max_positions))
        self.vocab_size = self.token_proj.shape[0]
        self.arange = torch.arange(ROPE_TABLE_MIN, device=self.device)  # its slices are index tensors for free

    def rope_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.rows(start, stop)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.at(positions)

    def fuse(self, token_rows: torch.Tensor, feats: torch.Tensor, zero_first_feature: bool = False) -> torch.Tensor:
        """fc([embed(token); feature]) for each row, from the rows of `token_proj` of the tokens."""
        y = F.linear(feats.to(self.dtype), self.fc_feat_w)
        if zero_first_feature:
            y[0] = 0.0
        return y.add_(token_rows)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(feats, self.head_w)


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, FastDraftWeights]" = weakref.WeakKeyDictionary()


def _stamp(model) -> tuple:
    return stamp_of(_sources(model))


def fast_weights(model) -> FastDraftWeights:
    """The inference layout of `model`'s weights, rebuilt only when a weight changed since the last call."""
    hit = _CACHE.get(model)
    if hit is not None and hit.stamp == _stamp(model):
        return hit
    with torch.inference_mode():
        hit = FastDraftWeights(model)
    _CACHE[model] = hit
    return hit


