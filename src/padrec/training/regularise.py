"""Dropout for a Hugging Face decoder that has none (Llama, Qwen2 apply none to their hidden states): on the token
embeddings and on the output of every attention and MLP block before it joins the residual stream, as in the
original Transformer and SASRec. Forward hooks, active only in training mode, so the saved weights, the config and
every inference path are unchanged."""

from __future__ import annotations

import torch.nn.functional as F


def add_dropout(model, p: float) -> list:
    """Register the hooks on `model` (a no-op for p == 0); returns their handles."""
    if p <= 0:
        return []

    def on_tensor(module, args, out):
        return F.dropout(out, p, module.training)

    def on_first(module, args, out):  # attention blocks return (states, weights)
        return (F.dropout(out[0], p, module.training), *out[1:])

    handles = [model.get_input_embeddings().register_forward_hook(on_tensor)]
    for name, module in model.named_modules():
        if name.endswith(".self_attn"):
            handles.append(module.register_forward_hook(on_first))
        elif name.endswith(".mlp"):
            handles.append(module.register_forward_hook(on_tensor))
    return handles
