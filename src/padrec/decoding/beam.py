"""Constrained beam search over one item's L SID tokens: the top-K next items for a prompt.

Scoring: an item's score is the sum over its L levels of the log-probability of its token under the *constrained*
next-token distribution, i.e. the log-softmax of the logits restricted to the allowed tokens (children of the node
that lead to a non-excluded item) - `apply_logits_processing` with greedy settings. A forced step (a single
allowed token) therefore adds exactly 0, and the scores of all non-excluded items form a proper distribution
(they sum, in probability, to 1). Ranking: stable order by (-score, SID token tuple), so ties break on the
lexicographically smaller SID, deterministically, in every implementation here.

`beam_search_items` / `beam_search_items_batch` share each prompt's prefix through tree attention (as AtSpeed does
for beams): the KV cache keeps ONE row per prompt, prefilled once. At each later model call all of a prompt's live
beams feed their newest tokens as new query tokens of that row, under a 4D additive float mask [B, 1, q, past + q]
(0 = may attend, finfo(dtype).min = masked; a bool 4D mask is misread by the eager path of transformers 5.24) in
which a token attends to its row's real prompt columns (left padding masked), to its own beam's ancestor tokens
fed at earlier calls (each beam records the cache column of every ancestor) and, causally, to its beam's tokens of
this call, itself included; position_ids = prompt length + level. The cache only grows, by (most beams of a row) x
(tokens per beam) columns per call: no reorder, no copy. Rows with fewer beams pad their query slots with PAD tokens
(they attend at least to themselves, so they stay finite; nothing attends to them and their logits are ignored).
A level at which every beam is forced makes no model call: its tokens are fed with the next call as extra query
tokens of the same beam (a causal chain). So the prompt costs one forward and each level at most one more (L-1 at
most after the prefill).
`beam_search_reference` is an independent cache-free beam search (full forward of prompt + prefix per level),
and `enumerate_items_reference` scores every item exhaustively; both are for tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import (
    GenerationConfig,
    check_prompt,
    device_of,
    apply_logits_processing,
    check_finite,
    left_pad,
    model_forward,
    new_cache,
)
from padrec.decoding.trie import ItemTrie, ListConstraint
from padrec.models.fast_target import fast_target, use_fast_target
from padrec.tokenizer.vocab import PAD

__all__ = [
    "BeamResult",
    "beam_search_items",
    "beam_search_items_batch",
    "beam_search_reference",
    "beam_rank_key",
    "enumerate_items_reference",
    "expansion_scores",
    "select_top_k",
]

_GREEDY = GenerationConfig(n_items=1)  # constraint only: log-softmax over the allowed tokens


@dataclass
class BeamResult:
    items: list[int]  # top-k item ids, best first
    scores: list[float]  # their summed constrained log-probabilities
    model_calls: int  # forward passes (for a batched result: of the whole batch)


def _check(beam_size: int, top_k: int) -> None:
    if beam_size < 1 or top_k < 1:
        raise PadrecError(f"beam_size and top_k must be >= 1, got {beam_size} and {top_k}")


def exclusion_constraint(trie: ItemTrie, exclude_items: Iterable[int]) -> ListConstraint:
    cons = ListConstraint(trie, exclude_items, no_duplicates=False)
    if cons.remaining_items == 0:
        raise PadrecError("beam search has nothing to rank: every catalogue item is excluded")
    return cons


class _Beam:
    __slots__ = ("score", "seq", "node", "anc", "extra")

    def __init__(self, score, seq, node, anc, extra):
        self.score = score  # float (python double)
        self.seq = seq  # SID tokens so far
        self.node = node  # trie node of seq
        self.anc = anc  # cache columns (in its prompt's cache row) of the tokens of seq already fed, in order
        self.extra = extra  # tokens of seq not fed to the model yet


def beam_search_items(
    model,
    prompt_tokens: Sequence[int],
    trie: ItemTrie,
    beam_size: int = 20,
    top_k: int = 10,
    exclude_items: Iterable[int] = (),
) -> BeamResult:
    """Top-`top_k` next items of one prompt by constrained beam search with KV cache (prompt prefilled once)."""
    return beam_search_items_batch(model, [prompt_tokens], trie, beam_size, top_k, batch_size=1,
                                   exclude_items=[list(exclude_items)])[0]


def beam_search_items_batch(
    model,
    prompts: Sequence[Sequence[int]],
    trie: ItemTrie,
    beam_size: int = 20,
    top_k: int = 10,
    batch_size: int = 64,
    exclude_items: Sequence[Iterable[int]] | None = None,
) -> list[BeamResult]:
    """`beam_search_items` over many prompts (left padding, explicit position_ids); results in input order."""
    _check(beam_size, top_k)
    if batch_size < 1:
        raise PadrecError(f"batch_size must be >= 1, got {batch_size}")
    if exclude_items is not None and len(exclude_items) != len(prompts):
        raise PadrecError(f"{len(exclude_items)} exclusion lists for {len(prompts)} prompts")
    prompts = [check_prompt(p) for p in prompts]
    excl = [list(e) for e in exclude_items] if exclude_items is not None else [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[BeamResult | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        res = _beam_chunk(model, [prompts[i] for i in idx], trie, beam_size, top_k, [excl[i] for i in idx])
        for i, r in zip(idx, res):
            out[i] = r
    return out  # type: ignore[return-value]


def beam_rank_key(score: float, seq: tuple[int, ...]) -> tuple:
    """The one ranking of beam candidates: higher score first, ties to the lexicographically smaller SID prefix.
    Every beam search here (plain, reference, speculative, the drafts' own) ranks with it, so they agree on ties."""
    return (-score, seq)


def expansion_scores(logits: torch.Tensor, allowed: Sequence[torch.Tensor], scores: Sequence[float]) -> torch.Tensor:
    """Flat candidate scores [nb * V] (float64, -inf = not allowed) of expanding nb beams by one token: beam score +
    constrained log-probability. `logits` [nb, V] (one row per beam; a forced beam's row only needs to be finite:
    a single allowed token gets log-probability 0 whatever the row), `allowed[i]` the LongTensor of beam i's
    allowed tokens."""
    dev = logits.device
    vocab = logits.shape[-1]
    flat = torch.cat([a.to(dev) + i * vocab for i, a in enumerate(allowed)])
    amask = torch.zeros(len(allowed) * vocab, dtype=torch.bool, device=dev)
    amask[flat] = True
    logp = apply_logits_processing(logits, amask.view(-1, vocab), _GREEDY).double()
    base = torch.as_tensor(scores, dtype=torch.float64, device=dev)
    return (logp + base[:, None]).view(-1)


def select_top_k(cands: torch.Tensor, prefixes: Sequence[tuple[int, ...]], vocab: int,
                 k: int) -> list[tuple[float, tuple, int, int]]:
    """Best `k` of the flat candidate scores [nb * V] (-inf = not allowed) by `beam_rank_key`; `prefixes[b]` is
    beam b's SID prefix. Returns (score, prefix + token, b, token), best first.

    topk finds the k-th best score; every candidate scoring at least that (ties included) is then sorted in
    Python by the exact key, so the tie-break does not depend on topk's internal order."""
    n_fin = int(torch.isfinite(cands).sum())
    k = min(k, n_fin)
    if k == 0:
        return []
    thr = torch.topk(cands, k).values[-1]
    sel = (cands >= thr).nonzero().squeeze(1).tolist()
    vals = cands[sel].tolist()
    picked = []
    for flat, score in zip(sel, vals):
        b, tok = divmod(flat, vocab)
        picked.append((score, prefixes[b] + (tok,), b, tok))
    picked.sort(key=lambda c: beam_rank_key(c[0], c[1]))
    return picked[:k]


def _model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


def _additive(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool [B, q, kv] (True = may attend) -> the 4D additive float mask [B, 1, q, kv] the HF forward uses as is
    (0 = attend, finfo.min = masked; a bool 4D mask is misread by the eager path of transformers 5.24)."""
    return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill_(
        ~allow, torch.finfo(dtype).min
    ).unsqueeze(1)


def _beam_chunk(model, prompts, trie: ItemTrie, beam_size, top_k, excludes) -> list[BeamResult]:
    dev = device_of(model)
    dtype = _model_dtype(model)
    nprompt = len(prompts)
    cons = [exclusion_constraint(trie, e) for e in excludes]
    base_ids, base_mask, base_pos = left_pad(prompts, dev)
    width = base_ids.shape[1]
    prompt_cols = base_mask.bool()  # [B, W]: the real (non-pad) prompt columns of each row
    plen = base_pos[:, -1:] + 1  # [B, 1]: position of each row's first SID token
    beams: list[list[_Beam]] = [[_Beam(0.0, (), 0, (), ())] for _ in range(nprompt)]
    past = 0  # cache columns so far (prompt + every query slot fed)
    fed = 0  # SID levels fed to the model so far (the same for every beam)
    calls = 0
    vocab = None
    cand = None
    # one prompt (batch 1, no padding): the fused target path, as the list decoders use; batches: Hugging Face
    ft = fast_target(model) if nprompt == 1 and use_fast_target(model) else None
    with torch.inference_mode():
        cache = ft.new_cache() if ft is not None else new_cache(model)
        for _level in range(trie.levels):
            flat_beams = [b for bs in beams for b in bs]
            allowed = [cons[p].children_allowed(b.node) for p, bs in enumerate(beams) for b in bs]
            all_forced = all(len(a[0]) == 1 for a in allowed)
            if not all_forced:
                k = len(flat_beams[0].extra)  # tokens per beam this call: the last decision + deferred forced ones
                nmax = max(len(bs) for bs in beams)
                ar = torch.arange(k, device=dev)
                if past == 0:  # prefill: the prompts plus the root's forced tokens (one beam per row)
                    ext = torch.tensor([b.extra for b in flat_beams], dtype=torch.long, device=dev).reshape(nprompt, k)
                    ids = torch.cat([base_ids, ext], dim=1)
                    q = width + k
                    keys = torch.cat([prompt_cols, torch.ones_like(ext, dtype=torch.bool)], dim=1)
                    allow = torch.ones(q, q, dtype=torch.bool, device=dev).tril()[None] & keys[:, None, :]
                    pos = torch.cat([base_pos, plen + ar], dim=1)
                    first_col = width  # column of beam 0's first new token
                else:  # tree step: all live beams of a row are query tokens of that row's single cache row
                    q = nmax * k
                    ids = torch.full((nprompt, nmax, k), PAD, dtype=torch.long)
                    anc = torch.zeros((nprompt, nmax, fed), dtype=torch.long)
                    for r, bs in enumerate(beams):
                        ids[r, : len(bs)] = torch.tensor([b.extra for b in bs], dtype=torch.long).reshape(len(bs), k)
                        anc[r, : len(bs)] = torch.tensor([b.anc for b in bs], dtype=torch.long).reshape(len(bs), fed)
                    ids = ids.view(nprompt, q).to(dev)
                    allow = torch.zeros((nprompt, q, past + q), dtype=torch.bool, device=dev)
                    allow[:, :, :width] = prompt_cols[:, None, :]
                    if fed:  # each slot sees its beam's ancestors (padding beams: column 0, harmless)
                        idx = anc.to(dev).repeat_interleave(k, dim=1)  # [B, q, fed]
                        allow[:, :, :past].scatter_(2, idx, True)
                    # the new block: causal inside each beam's k tokens, nothing across beams
                    allow[:, :, past:] = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool)] * nmax).tril().to(dev)
                    pos = plen + fed + ar.repeat(nmax)[None]
                    first_col = past
                # every slot attends at least to itself: padding slots stay finite (a NaN key would poison
                # every query of the row through 0 * NaN)
                allow[:, :, past : past + q] |= torch.eye(q, dtype=torch.bool, device=dev)
                prefill = past == 0
                if ft is not None:
                    out, _ = ft.forward(cache, ids[0].tolist(), past, pos[0].tolist(), allow[0],
                                        head_rows=slice(-1, None) if prefill else None)
                    logits = out[None]
                else:
                    logits, cache = model_forward(model, ids, cache, _additive(allow, dtype), pos, last_only=prefill)
                calls += 1
                if prefill:
                    logits = logits[:, -1]
                else:
                    keep = torch.tensor([r * nmax + j for r, bs in enumerate(beams) for j in range(len(bs))],
                                        dtype=torch.long, device=dev)
                    logits = logits[:, k - 1 :: k].reshape(nprompt * nmax, -1).index_select(0, keep)
                logits = check_finite(logits)
                vocab = logits.shape[-1]
                for bs in beams:
                    for j, b in enumerate(bs):
                        c = first_col + j * k
                        b.anc, b.extra = b.anc + tuple(range(c, c + k)), ()
                past += q
                fed += k
                cand = expansion_scores(logits, [a[1] for a in allowed], [b.score for b in flat_beams])
            new_beams = []
            row = 0
            for p, bs in enumerate(beams):
                if all_forced:
                    picked = [(b.score, b.seq + (a[0][0],), j, a[0][0]) for j, (b, a) in
                              enumerate(zip(bs, allowed[row : row + len(bs)]))]
                else:
                    picked = select_top_k(cand[row * vocab : (row + len(bs)) * vocab], [b.seq for b in bs], vocab,
                                          beam_size)
                nxt = []
                for score, seq, j, tok in picked:
                    parent = bs[j]
                    nxt.append(_Beam(score, seq, trie.child_of[parent.node][tok], parent.anc, parent.extra + (tok,)))
                new_beams.append(nxt)
                row += len(bs)
            beams = new_beams
    results = []
    for bs in beams:
        top = bs[:top_k]
        results.append(BeamResult([trie.leaf_item[b.node] for b in top], [b.score for b in top], calls))
    return results


# ------------------------------------------------------------------------------------------------------------
# references for tests
# ------------------------------------------------------------------------------------------------------------
def _full_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """Next-token logits after each of several equal-length sequences, full forward without a cache."""
    dev = device_of(model)
    out = model(input_ids=torch.tensor(seqs, dtype=torch.long, device=dev), use_cache=False)
    return out.logits[:, -1]


def beam_search_reference(
    model,
    prompt_tokens: Sequence[int],
    trie: ItemTrie,
    beam_size: int = 20,
    top_k: int = 10,
    exclude_items: Iterable[int] = (),
) -> BeamResult:
    """Plain beam search without KV cache: each level recomputes a full forward over prompt + prefix per beam."""
    _check(beam_size, top_k)
    prompt = check_prompt(prompt_tokens)
    cons = exclusion_constraint(trie, exclude_items)
    beams: list[tuple[float, tuple[int, ...], int]] = [(0.0, (), 0)]
    calls = 0
    with torch.inference_mode():
        for _level in range(trie.levels):
            logits = _full_logits(model, [prompt + list(seq) for _, seq, _ in beams])
            calls += 1
            cands = []
            for row, (score, seq, node) in enumerate(beams):
                toks, tensor = cons.children_allowed(node)
                logp = apply_logits_processing(logits[row], tensor.to(logits.device), _GREEDY).tolist()
                for tok, lp in zip(toks, logp):
                    cands.append((score + lp, seq + (tok,), trie.child_of[node][tok]))
            cands.sort(key=lambda c: beam_rank_key(c[0], c[1]))
            beams = cands[:beam_size]
    top = beams[:top_k]
    return BeamResult([trie.leaf_item[node] for _, _, node in top], [s for s, _, _ in top], calls)


def enumerate_items_reference(
    model, prompt_tokens: Sequence[int], trie: ItemTrie, top_k: int | None = None, exclude_items: Iterable[int] = ()
) -> BeamResult:
    """Exhaustive: the constrained log-probability of every non-excluded item, ranked by (-score, SID)."""
    prompt = check_prompt(prompt_tokens)
    cons = exclusion_constraint(trie, exclude_items)
    dev = device_of(model)
    scored = []
    with torch.inference_mode():
        for item, toks in enumerate(trie.item_tokens):
            if item in cons.banned:
                continue
            seq = prompt + list(toks)
            logits = model(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits[0]
            node, score = 0, 0.0
            for d, tok in enumerate(toks):
                allowed, tensor = cons.children_allowed(node)
                logp = apply_logits_processing(logits[len(prompt) - 1 + d], tensor.to(dev), _GREEDY)
                score += float(logp[allowed.index(tok)])
                node = trie.child_of[node][tok]
            scored.append((score, toks, item))
    scored.sort(key=lambda c: beam_rank_key(c[0], c[1]))
    top = scored[: (top_k or len(scored))]
    return BeamResult([i for _, _, i in top], [s for s, _, _ in top], len(scored))
