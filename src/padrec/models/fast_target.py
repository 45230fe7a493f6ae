"""Batch-1 inference of a Llama-style target with plain torch ops: the autoregressive decoder's and the verifier's
shared model path.

At batch 1 on a CPU a small target's step is mostly per-op overhead: Hugging Face's decoder goes through a stack
of nn.Module calls per layer, a rotary module that recomputes cos/sin on every call, a DynamicCache that
concatenates on every append, and a separate product per q/k/v projection. `FastTarget` computes the same
function from the same weights with the pieces it shares with the EAGLE draft's fused path (`models/fused_layer.py`):
q/k/v as one product, a cos/sin table, keys/values in preallocated per-layer buffers (`KVBuffer`) where appending
is a copy into place and dropping rejected tree nodes moves an integer or a few rows.

It covers `LlamaForCausalLM` (every padrec preset) and `Qwen2ForCausalLM` (biased q/k/v) targets; anything else
(other biased projections, sliding windows, soft-capping, other RoPE types, other architectures) runs through
Hugging Face (`supports_fast_target` says why).
The summation order of some products differs from the module path (the fused q/k/v product), so logits agree to
float32 rounding; `generate_list_reference`, which stays on the Hugging Face path, is the check
(tests/test_fast_target.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from padrec.models.fused_layer import KVBuffer, LayerWeights, RopeTable, layer_sources, layer_support, rms_norm, stamp_of

__all__ = ["FastTarget", "fast_target", "supports_fast_target", "use_fast_target"]


def supports_fast_target(model) -> str | None:
    """None when `model` can run on `FastTarget`; otherwise why not."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    if type(model) not in (LlamaForCausalLM, Qwen2ForCausalLM):
        return f"{type(model).__name__} is neither a LlamaForCausalLM nor a Qwen2ForCausalLM"
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        return "final-logit soft-capping"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return "an LM head with a bias"
    base = model.get_decoder()
    for i, layer in enumerate(base.layers):
        why = layer_support(layer, base.rotary_emb, qkv_bias=True)
        if why is not None:
            return f"layer {i}: {why}"
    return None


def _sources(model) -> list[torch.Tensor]:
    base = model.get_decoder()
    out = [base.embed_tokens.weight, base.norm.weight, model.get_output_embeddings().weight, base.rotary_emb.inv_freq]
    for layer in base.layers:
        out += layer_sources(layer)
    return out


class FastTarget:
    """A snapshot of a Llama target's weights in inference layout, and its batch-1 forward over a `KVBuffer` per
    layer. Read-only once built."""

    def __init__(self, model):
        why = supports_fast_target(model)
        if why is not None:
            raise ValueError(f"no fused inference path for this target: {why}")
        self.stamp = stamp_of(_sources(model))
        cfg = model.config
        base = model.get_decoder()
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.kv_heads = kv_heads
        self.layers = [LayerWeights(layer, cfg.hidden_size, heads, kv_heads, self.head_dim) for layer in base.layers]
        with torch.no_grad():
            self.embed = base.embed_tokens.weight.detach()
            self.norm_w = base.norm.weight.detach()
            self.head_w = model.get_output_embeddings().weight.detach()
        self.norm_eps = float(base.norm.variance_epsilon)
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.rope = RopeTable(base.rotary_emb, self.head_dim, self.dtype, self.device,
                              int(getattr(cfg, "max_position_embeddings", 0) or 0))
        self._neg = torch.finfo(self.dtype).min

    def new_cache(self) -> list[KVBuffer]:
        return [KVBuffer(self.kv_heads, self.head_dim, self.dtype, self.device) for _ in self.layers]

    def forward(self, cache: list[KVBuffer], tokens: Sequence[int], start: int, positions: Sequence[int] | None = None,
                visible: torch.Tensor | None = None, head_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `tokens` after the first `start` cached entries (their keys/values are written at start..start+q-1,
        the buffers then end there). Positions: `positions`, or start..start+q-1. Attention: bool `visible`
        [q, start + q], or causal when None. Returns logits [q', V] for the rows `head_rows` (all when None) and
        the final-norm hidden states [q, d]."""
        q = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        h = self.embed.index_select(0, ids)
        if positions is None:
            cos, sin = self.rope.rows(start, start + q)
        else:
            cos, sin = self.rope.at(torch.tensor(list(positions), dtype=torch.long, device=self.device))
        mask = None
        if visible is not None:
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~visible.to(self.device), self._neg)
            mask = mask[None, None]
        elif q > 1:
            allowed = torch.ones(q, start + q, dtype=torch.bool, device=self.device).tril_(diagonal=start)
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, self._neg)
            mask = mask[None, None]
        for lw, kv in zip(self.layers, cache):
            x = rms_norm(h, lw.ln1, lw.eps1)
            qs, ks, vs = lw.qkv(x, cos, sin)
            kv.write(start, ks, vs)
            h = lw.finish(h, lw.attend(qs, kv, start + q, mask))
        hidden = rms_norm(h, self.norm_w, self.norm_eps)
        rows = hidden if head_rows is None else hidden[head_rows]
        return F.linear(rows, self.head_w), hidden


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, FastTarget]" = weakref.WeakKeyDictionary()


def fast_target(model) -> FastTarget:
    """The inference layout of `model`'s weights, rebuilt only when a weight changed since the last call."""
    hit = _CACHE.get(model)
    if hit is not None and hit.stamp == stamp_of(_sources(model)):
        return hit
    with torch.inference_mode():
        hit = FastTarget(model)
    _CACHE[model] = hit
    return hit


def use_fast_target(model, fast: bool | None = None) -> bool:
    """Whether to run `model` on `FastTarget`: `fast` when given (True for a model it cannot run is an error),
    else whenever it can."""
    why = supports_fast_target(model)
    if fast is None:
        return why is None
    if fast and why is not None:
        raise ValueError(f"no fused inference path for this target: {why}")
    return bool(fast)

