"""Constrained list-wise generation with a causal LM target: reference, fast batch-1 and batched paths.

A prompt is `[BOS] + (L SID tokens + [SEP]) per history item`; the model continues with `cfg.n_items` items, each
exactly L tokens then SEP, always inside the catalogue (see `ListConstraint`). The list's ranking is the order of
generation.

Sampled distribution (one place: `apply_logits_processing`): the logits are restricted to the allowed tokens, then
divided by the temperature, then top-k, then top-p (nucleus) filtering; the result is renormalised. Greedy decoding
takes the arg-max of the constrained logits (ties -> smallest token id).

Random numbers: a sampling decision draws exactly one uniform number from the generator (inverse-CDF sampling), and
only at *real* decisions. A forced step (exactly one allowed token: SEP after the last level, or a trie node with a
single live child) draws nothing, in every decoder, the reference one included, even though the reference still
calls the model there. So the reference and the fast path consume the same random stream and, with the same
generator seed, produce the same list. The batched path draws one number per row per non-forced step, so its
sampled lists are valid samples of the same distribution but not the batch-1 streams; its greedy lists equal
the batch-1 ones.

Cache API (transformers 5.x): `forward(..., cache=DynamicCache, use_cache=True)`; `past_key_values=` is still
accepted but deprecated (removal announced for 5.40) and warns, so `model_forward` passes whichever name the
model's forward takes. The DynamicCache is updated in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from padrec import PadrecError
from padrec.decoding.trie import ItemTrie, ListConstraint
from padrec.models.fast_target import fast_target, use_fast_target
from padrec.tokenizer.vocab import PAD

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "apply_logits_processing",
    "sample_from_logprobs",
    "model_forward",
    "check_finite",
    "new_cache",
    "make_constraint",
    "generate_list_reference",
    "generate_list",
    "generate_list_batch",
]


@dataclass
class GenerationConfig:
    n_items: int = 10
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    no_duplicates: bool = True
    exclude_history: bool = False

    def __post_init__(self):
        if self.n_items < 1:
            raise PadrecError(f"n_items must be >= 1, got {self.n_items}")
        if not self.temperature > 0:
            raise PadrecError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise PadrecError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise PadrecError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    items: list[int]  # generated item ids, in generation (= ranking) order
    tokens: list[int]  # generated tokens: n_items * (L SID tokens + SEP)
    model_calls: int  # forward passes (for a batched result: of the whole batch this row was decoded in)


# ------------------------------------------------------------------------------------------------------------
# model plumbing
# ------------------------------------------------------------------------------------------------------------
_FORWARD_KW: dict[type, tuple[str, bool]] = {}


def _forward_kwargs(model) -> tuple[str, bool]:
    cls = type(model)
    hit = _FORWARD_KW.get(cls)
    if hit is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        hit = (name, "logits_to_keep" in params)
        _FORWARD_KW[cls] = hit
    return hit


def new_cache(model):
    """An empty DynamicCache for `model` (config-aware, so sliding-window layers get the right layer type)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - configs a DynamicCache cannot read: plain full-attention layers
        return DynamicCache()


def cache_kwargs(module, cache, attention_mask=None, position_ids=None) -> dict:
    """Keyword arguments of a cached forward of `module` (an HF model or its decoder), under whichever name its
    forward takes the cache."""
    kwargs = {_forward_kwargs(module)[0]: cache, "use_cache": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return kwargs


def model_forward(model, input_ids, cache, attention_mask=None, position_ids=None, last_only=True):
    """One forward pass with the KV cache (updated in place). Returns logits [B, T or 1, V] and the cache."""
    kwargs = cache_kwargs(model, cache, attention_mask, position_ids)
    if last_only and _forward_kwargs(model)[1]:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, **kwargs)
    new = getattr(out, "cache", None)
    if new is None:
        new = getattr(out, "past_key_values", None)
    return out.logits, (new if new is not None else cache)


# ------------------------------------------------------------------------------------------------------------
# the sampled distribution, defined once
# ------------------------------------------------------------------------------------------------------------
def apply_logits_processing(logits: torch.Tensor, allowed: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Log-probabilities of the next token under the constraint and the sampling settings of `cfg`.

    `allowed` is either a LongTensor of allowed token ids (1-D, sorted): the result is over that subset,
    shape [..., len(allowed)]; or a bool mask shaped like `logits`: the result is over the full vocabulary with
    -inf outside the mask. Steps: constraint, temperature (sampling only), top-k, top-p, log-softmax. With
    `cfg.do_sample=False` only the constraint applies (the log-softmax of the constrained logits), which is also
    what beam search scores with. Computed in float32 at least (float64 logits stay float64).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if allowed.dtype == torch.bool:
        x = logits.masked_fill(~allowed, float("-inf"))
    else:
        x = logits.index_select(-1, allowed)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            x = x / cfg.temperature
        n = x.shape[-1]
        if 0 < cfg.top_k < n:
            kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if cfg.top_p < 1.0:
            # sort the logits (not the rounded probabilities), so the nucleus is always a top set of the logits
            sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
            sorted_p = torch.softmax(sorted_x, dim=-1)
            mass_before = sorted_p.cumsum(-1) - sorted_p
            drop_sorted = mass_before >= cfg.top_p  # never drops the most likely token
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def sample_from_logprobs(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform draw per row of `logprobs` [..., A] -> indices [...]. Zero-probability
    entries are never chosen."""
    probs = logprobs.exp()
    cdf = probs.cumsum(-1)
    # drawn where the generator lives (a CPU generator with a model on a GPU), so a seed gives the same numbers
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype,
                   device=generator.device if generator is not None else cdf.device).to(cdf.device)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return idx.clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def check_finite(logits: torch.Tensor) -> torch.Tensor:
    """Padded batches: fail loudly on NaN logits instead of ranking garbage. (Seen with transformers 5.24's eager
    attention in float64 with left padding: fully-masked pad queries turn NaN and leak through the next layer;
    sdpa is fine.)"""
    if torch.isnan(logits).any():
        raise PadrecError(
            "the model produced NaN logits on a left-padded batch; try attn_implementation='sdpa' "
            "(or float32/bfloat16), or batch_size=1"
        )
    return logits


def choose_token(logits_row: torch.Tensor, toks: tuple[int, ...], tensor: torch.Tensor, cfg, generator) -> int:
    """Pick the next token at a real decision (len(toks) > 1) from one row of logits [V]."""
    if not cfg.do_sample:
        return toks[int(logits_row.index_select(0, tensor).argmax())]
    return toks[int(sample_from_logprobs(apply_logits_processing(logits_row, tensor, cfg), generator))]


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def make_constraint(trie: ItemTrie, prompt_tokens: Sequence[int], cfg: GenerationConfig, history=None) -> ListConstraint:
    """The list constraint of one request. With `cfg.exclude_history` the history items are banned: `history`
    (item ids) when given, else the items parsed from the prompt."""
    banned = ()
    if cfg.exclude_history:
        banned = trie.parse_items(prompt_tokens) if history is None else [int(i) for i in history]
    cons = ListConstraint(trie, banned, cfg.no_duplicates)
    if cfg.no_duplicates and cons.remaining_items < cfg.n_items:
        raise PadrecError(
            f"cannot generate {cfg.n_items} distinct items: only {cons.remaining_items} of the catalogue's "
            f"{trie.num_items} items are not excluded"
        )
    return cons


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch: ids, attention mask and position ids (0 at each prompt's first real token),
    so every row's next token sits in the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_(min=0)


def check_prompt(prompt_tokens) -> list[int]:
    prompt = [int(t) for t in prompt_tokens]
    if not prompt:
        raise PadrecError("empty prompt: it needs at least the BOS token")
    return prompt


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------
# decoders
# ------------------------------------------------------------------------------------------------------------
def generate_list_reference(
    model, prompt_tokens: Sequence[int], trie: ItemTrie, cfg: GenerationConfig, generator=None, history=None
) -> GenerationResult:
    """Plain reference decoder, batch 1: KV cache, one model call per generated token (forced tokens included).

    At forced steps it still calls the model but takes the single allowed token without drawing a random number
    (the fast path never sees those logits), so both paths share one random stream.
    """
    prompt = check_prompt(prompt_tokens)
    cons = make_constraint(trie, prompt, cfg, history)
    dev = device_of(model)
    total = cfg.n_items * (trie.levels + 1)
    tokens: list[int] = []
    with torch.inference_mode():
        cache = new_cache(model)
        logits, cache = model_forward(model, torch.tensor([prompt], device=dev), cache)
        calls = 1
        while True:
            toks, tensor = cons.allowed_with_tensor()
            if len(toks) == 1:
                tok = toks[0]
            else:
                tok = choose_token(logits[0, -1], toks, tensor.to(dev), cfg, generator)
            cons.advance(tok)
            tokens.append(tok)
            if len(tokens) == total:
                break
            logits, cache = model_forward(model, torch.tensor([[tok]], device=dev), cache)
            calls += 1
    return GenerationResult(list(cons.completed_items), tokens, calls)


def generate_list(
    model, prompt_tokens: Sequence[int], trie: ItemTrie, cfg: GenerationConfig, generator=None, history=None,
    fast: bool | None = None,
) -> GenerationResult:
    """Fast batch-1 decoder. Forced tokens are appended without a model call and fed, together with the token
    of the last decision, in the next model call (one forward over several new tokens with the KV cache).
    Same output as `generate_list_reference` (greedy, and sampling with the same generator seed).

    `fast`: run the target on the fused path (`padrec.models.fast_target`; default whenever the model allows it)
    or through Hugging Face (False)."""
    prompt = check_prompt(prompt_tokens)
    cons = make_constraint(trie, prompt, cfg, history)
    dev = device_of(model)
    on_cpu = dev.type == "cpu"
    total = cfg.n_items * (trie.levels + 1)
    tokens: list[int] = []
    pending = list(prompt)  # tokens not yet fed to the model
    calls = 0
    allowed = cons.allowed_with_tensor
    advance = cons.advance
    with torch.inference_mode():
        if use_fast_target(model, fast):
            ft = fast_target(model)
            buffers, cached = ft.new_cache(), 0
            last_row = slice(-1, None)

            def step(new: list[int]) -> torch.Tensor:
                nonlocal cached
                logits, _ = ft.forward(buffers, new, cached, head_rows=last_row)
                cached += len(new)
                return logits[-1]
        else:
            cache = new_cache(model)

            def step(new: list[int]) -> torch.Tensor:
                nonlocal cache
                logits, cache = model_forward(model, torch.tensor([new], device=dev), cache)
                return logits[0, -1]

        while True:
            toks, tensor = allowed()
            if len(toks) == 1:  # forced: no model call, no random draw
                tok = toks[0]
            else:
                row = step(pending)
                calls += 1
                tok = choose_token(row, toks, tensor if on_cpu else tensor.to(dev), cfg, generator)
                pending = []
            advance(tok)
            tokens.append(tok)
            if len(tokens) == total:
                break
            pending.append(tok)
    return GenerationResult(list(cons.completed_items), tokens, calls)


def generate_list_batch(
    model,
    prompts: Sequence[Sequence[int]],
    trie: ItemTrie,
    cfg: GenerationConfig,
    histories: Sequence[Sequence[int]] | None = None,
    batch_size: int = 64,
    generator=None,
) -> list[GenerationResult]:
    """Batched decoder for evaluation: left padding with attention_mask and explicit position_ids, one token per
    row per step, per-row constraints applied as a mask. A step on which every row is forced (e.g. the SEP after
    the last level, always common to all rows) makes no model call; its tokens are fed with the next call.
    Prompts are bucketed by length internally; results come back in input order. Greedy lists equal
    `generate_list`'s; sampling draws one uniform number per row at real decisions (not the batch-1 stream).
    """
    if batch_size < 1:
        raise PadrecError(f"batch_size must be >= 1, got {batch_size}")
    if histories is not None and len(histories) != len(prompts):
        raise PadrecError(f"{len(histories)} histories for {len(prompts)} prompts")
    prompts = [check_prompt(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[GenerationResult | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        hist = None if histories is None else [histories[i] for i in idx]
        for i, res in zip(idx, _generate_chunk(model, [prompts[i] for i in idx], trie, cfg, hist, generator)):
            results[i] = res
    return results  # type: ignore[return-value]


def _generate_chunk(model, prompts, trie, cfg, histories, generator) -> list[GenerationResult]:
    dev = device_of(model)
    bsz = len(prompts)
    cons = [make_constraint(trie, p, cfg, None if histories is None else histories[r]) for r, p in enumerate(prompts)]
    ids, mask, pos = left_pad(prompts, dev)
    next_pos = pos[:, -1:] + 1  # [B, 1]
    total = cfg.n_items * (trie.levels + 1)
    tokens = [[] for _ in range(bsz)]
    pending_ids, pending_mask, pending_pos = ids, mask, pos  # the prompt is fed with the first model call
    full_mask = None
    calls = 0
    with torch.inference_mode():
        cache = new_cache(model)
        vocab = None
        for _step in range(total):
            allowed = [c.allowed_with_tensor() for c in cons]
            forced = [len(a[0]) == 1 for a in allowed]
            if all(forced):
                step_tokens = [a[0][0] for a in allowed]
            else:
                full_mask = pending_mask if full_mask is None else torch.cat([full_mask, pending_mask], dim=1)
                logits, cache = model_forward(model, pending_ids, cache, full_mask, pending_pos)
                calls += 1
                logits = check_finite(logits[:, -1])
                if vocab is None:
                    vocab = logits.shape[-1]
                flat = torch.cat([a[1] + r * vocab for r, a in enumerate(allowed)]).to(dev)
                amask = torch.zeros(bsz * vocab, dtype=torch.bool, device=dev)
                amask[flat] = True
                amask = amask.view(bsz, vocab)
                if cfg.do_sample:
                    choice = sample_from_logprobs(apply_logits_processing(logits, amask, cfg), generator)
                else:
                    choice = logits.masked_fill(~amask, float("-inf")).argmax(-1)
                step_tokens = choice.tolist()
                for r, a in enumerate(allowed):
                    if forced[r]:
                        step_tokens[r] = a[0][0]
                pending_ids = pending_ids[:, :0]
                pending_mask = pending_mask[:, :0]
                pending_pos = pending_pos[:, :0]
            for r, tok in enumerate(step_tokens):
                cons[r].advance(tok)
                tokens[r].append(tok)
            new = torch.tensor(step_tokens, dtype=torch.long, device=dev).unsqueeze(1)
            pending_ids = torch.cat([pending_ids, new], dim=1)
            pending_mask = torch.cat([pending_mask, torch.ones_like(new)], dim=1)
            pending_pos = torch.cat([pending_pos, next_pos], dim=1)
            next_pos = next_pos + 1
    return [GenerationResult(list(c.completed_items), t, calls) for c, t in zip(cons, tokens)]
