"""KV-cache and attention-mask plumbing shared by the target verifier and the LM draft adapter.

Tree attention through a Hugging Face causal LM (transformers 5.x): pass a 4D *additive* float mask
[1, 1, q, past + q] (0 where a query may attend, `torch.finfo(dtype).min` elsewhere) together with explicit
`position_ids`. (A bool 4D mask is silently mishandled on the eager path, so it is never used here.) The model appends
the q new keys/values to its DynamicCache in the order they were fed; after a verification only some of them are
kept (`keep_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import cache_kwargs, new_cache
from padrec.models.fast_target import fast_target, use_fast_target

__all__ = [
    "additive_mask",
    "cache_length",
    "session_cache",
    "ancestor_matrix",
    "check_tree_cache",
    "decoder_forward",
    "keep_positions",
    "keep_prefix_and",
    "model_dtype_device",
]


def session_cache(model, fast: bool | None = None):
    """The KV cache of a batch-1 session over `model`: (fast, FastTarget or None, cache). On the fused path
    (`padrec.models.fast_target`, whenever it applies, or as `fast` says) the cache is its per-layer buffers; else a
    DynamicCache, checked for tree attention."""
    if use_fast_target(model, fast):
        ft = fast_target(model)
        return True, ft, ft.new_cache()
    cache = new_cache(model)
    check_tree_cache(cache)
    return False, None, cache


def cache_length(cache) -> int:
    """Entries in a session cache of either kind."""
    return cache[0].length if isinstance(cache, list) else cache.get_seq_length()


def model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    try:
        p = next(model.parameters())
        return p.dtype, p.device
    except (StopIteration, AttributeError):
        return torch.float32, torch.device("cpu")


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool `visible` [q, k] -> additive float mask [1, 1, q, k] (0 visible, finfo.min hidden)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def ancestor_matrix(parents: Sequence[int]) -> torch.Tensor:
    """bool [N, N]: entry (i, j) is True iff node j is node i or one of its ancestors. `parents[i]` is -1 (the
    root, i.e. the token the tree hangs below) or an index < i."""
    n = len(parents)
    # ancestor lists in Python and one scatter: a tensor op per node costs more than the whole tree's bookkeeping
    rows: list[list[int]] = []
    flat: list[int] = []
    for i, p in enumerate(parents):
        if p >= 0:
            if p >= i:
                raise PadrecError(f"tree node {i} has parent {p}: parents must precede their children")
            row = rows[p] + [i]
        else:
            row = [i]
        rows.append(row)
        base = i * n
        flat += [base + j for j in row]
    anc = torch.zeros(n * n, dtype=torch.bool)
    if flat:
        anc.index_fill_(0, torch.tensor(flat, dtype=torch.long), True)
    return anc.view(n, n)


def check_tree_cache(cache) -> None:
    """Tree attention and `keep_positions` need plain full-attention cache layers (keys/values [B, H, T, D])."""
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise PadrecError(
                f"cache layer {i} ({type(layer).__name__}) is not a full-attention DynamicLayer: speculative "
                f"tree decoding needs full attention in every layer"
            )


def keep_positions(cache, keep_index: Sequence[int] | torch.Tensor) -> None:
    """Keep only the cache positions `keep_index` (strictly increasing), in that order, in every layer.

    Positions before the first gap are left untouched; the kept tail is moved down in place and the rest is cut
    off, so the cost is proportional to the tail, not to the whole context.
    """
    keep = [int(i) for i in (keep_index.tolist() if isinstance(keep_index, torch.Tensor) else keep_index)]
    if any(b <= a for a, b in zip(keep, keep[1:])) or (keep and keep[0] < 0):
        raise PadrecError("keep_positions needs strictly increasing, non-negative positions")
    n = len(keep)
    start = 0
    while start < n and keep[start] == start:
        start += 1
    keep_prefix_and(cache, start, keep[start:])


def keep_prefix_and(cache, prefix: int, tail: Sequence[int]) -> None:
    """`keep_positions(cache, [0, 1, ..., prefix - 1] + tail)` for a tail that is strictly increasing and starts at
    `prefix` or later (not checked), without building and scanning the whole index list: after a verification the
    prefix is the entire committed context and the tail only the accepted path.

    `cache`: a DynamicCache, or the fused path's list of per-layer `KVBuffer`s (`session_cache`), whose keys and
    values also have the sequence on axis -2; a buffer is cut by moving its length, not by slicing."""
    tail = [int(i) for i in tail]
    skip = 0
    while skip < len(tail) and tail[skip] == prefix + skip:  # already in place
        skip += 1
    start, n = prefix + skip, prefix + len(tail)
    fused = isinstance(cache, list)
    if not fused:
        check_tree_cache(cache)
    moved = None
    for layer in cache if fused else cache.layers:
        if not fused and (not getattr(layer, "is_initialized", True) or layer.keys is None
                          or layer.keys.numel() == 0):
            if n:
                raise PadrecError("keep_positions on an empty cache layer")
            continue
        length = layer.length if fused else layer.keys.shape[-2]
        last = tail[-1] if tail else prefix - 1
        if last >= length:
            raise PadrecError(f"keep_positions: position {last} beyond the cache length {length}")
        if start < n:
            if moved is None or moved.device != layer.keys.device:
                moved = torch.tensor(tail[skip:], dtype=torch.long, device=layer.keys.device)
            layer.keys[..., start:n, :] = layer.keys.index_select(-2, moved)
            layer.values[..., start:n, :] = layer.values.index_select(-2, moved)
        if fused:
            layer.length = n
        elif n < length:
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]


def decoder_forward(model, input_ids, cache, attention_mask=None, position_ids=None, head_rows=None):
    """One forward of the model's decoder stack (cache updated in place) and its LM head.

    Returns (logits [B, T', V], hidden [B, T, d]) where `hidden` is the last hidden state after the final norm (the
    LM head's input) and the logits are computed for the rows `head_rows` of the sequence (all when None), so a
    caller gets the target's next-token logits and its features from one pass. Final-logit soft-capping
    (`config.final_logit_softcapping`, Gemma 2 style) is applied like the model's own forward would.
    """
    base = model.get_decoder()
    out = base(input_ids=input_ids, **cache_kwargs(base, cache, attention_mask, position_ids))
    hidden = out.last_hidden_state
    h = hidden if head_rows is None else hidden[:, head_rows]
    logits = model.get_output_embeddings()(h)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, hidden
