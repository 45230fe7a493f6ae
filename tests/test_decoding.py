"""Property tests of the constrained decoders (trie, list-wise generation, beam search) on tiny random Llamas.

Equality tests run the models in float64 with attn_implementation="sdpa": the decoders feed different token
chunks / paddings to the model (one forward over several tokens vs one per token, left padding), which in float32
moves logits by ~1e-8 and could flip a near-tie; in float64 that cannot happen in practice. (Eager attention in
float64 with left padding yields NaN in transformers 5.24 - see `check_finite` - so sdpa it is.)
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from padrec import PadrecError
from padrec.decoding.autoregressive import (
    GenerationConfig,
    apply_logits_processing,
    generate_list,
    generate_list_batch,
    generate_list_reference,
    make_constraint,
    sample_from_logprobs,
)
from padrec.decoding.beam import (
    beam_search_items,
    beam_search_items_batch,
    beam_search_reference,
    enumerate_items_reference,
)
from padrec.decoding.trie import ItemTrie, ListConstraint
from padrec.tokenizer.vocab import BOS, SEP, SIDVocab

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=16)
def tiny_model(vocab_size: int, seed: int, dtype=torch.float64, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.2,  # logits spread ~1.5 and depend on the context (0.02 gives near-constant logits)
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval().to(dtype)


@st.composite
def catalogues(draw, min_items=5, max_items=25):
    layout = draw(st.sampled_from(["per_level", "shared"]))
    sizes = draw(
        st.lists(st.integers(1, 4), min_size=2, max_size=3).filter(lambda s: math.prod(s) >= min_items)
    )
    vocab = SIDVocab(tuple(sizes), layout)
    all_codes = list(itertools.product(*(range(s) for s in sizes)))
    n = draw(st.integers(min_items, min(max_items, len(all_codes))))
    perm = draw(st.permutations(range(len(all_codes))))
    items = [vocab.item_tokens(all_codes[i]) for i in perm[:n]]
    return vocab, items


def make_prompt(items, history):
    return [BOS] + [t for i in history for t in (*items[i], SEP)]


@st.composite
def requests(draw, max_prompts=1):
    """A catalogue, a model seed, some prompts (histories) and a generation config that can be satisfied."""
    vocab, items = draw(catalogues())
    seed = draw(st.integers(0, 3))
    histories = [
        draw(st.lists(st.integers(0, len(items) - 1), max_size=4)) for _ in range(draw(st.integers(1, max_prompts)))
    ]
    no_dup = draw(st.booleans())
    excl = draw(st.booleans())
    free = len(items) - (max(len(set(h)) for h in histories) if excl else 0)
    n_items = draw(st.integers(1, min(6, free) if no_dup else 6))
    return vocab, items, seed, histories, dict(n_items=n_items, no_duplicates=no_dup, exclude_history=excl)


def assert_valid(res, items, history, cfg: GenerationConfig):
    trie_items = {t: i for i, t in enumerate(items)}
    L = len(items[0])
    assert len(res.items) == cfg.n_items
    assert len(res.tokens) == cfg.n_items * (L + 1)
    for k, item in enumerate(res.items):
        chunk = res.tokens[k * (L + 1) : (k + 1) * (L + 1)]
        assert chunk[-1] == SEP
        assert trie_items.get(tuple(chunk[:-1])) == item  # a real catalogue item, and the reported one
    if cfg.no_duplicates:
        assert len(set(res.items)) == len(res.items)
    if cfg.exclude_history:
        assert not set(res.items) & set(history)


# ------------------------------------------------------------------------------------------------------------
# trie and constraint
# ------------------------------------------------------------------------------------------------------------
def brute_allowed(items, prefix, banned):
    d = len(prefix)
    return tuple(sorted({it[d] for i, it in enumerate(items) if it[:d] == tuple(prefix) and i not in banned}))


@settings(max_examples=100, **SETTINGS)
@given(cat=catalogues(), data=st.data())
def test_trie_allowed_matches_bruteforce(cat, data):
    _, items = cat
    trie = ItemTrie(items)
    L = len(items[0])
    banned = set(data.draw(st.lists(st.integers(0, len(items) - 1), max_size=len(items) - 1)))
    cons = ListConstraint(trie, banned, no_duplicates=False)
    for _ in range(5):
        item = data.draw(st.integers(0, len(items) - 1))
        d = data.draw(st.integers(0, L - 1))
        prefix = items[item][:d]
        node = trie.node_of(prefix)
        assert node is not None
        assert trie.child_tokens[node] == brute_allowed(items, prefix, set())
        assert trie.child_tensor[node].tolist() == list(trie.child_tokens[node])
        toks, tensor = cons.children_allowed(node)
        assert toks == brute_allowed(items, prefix, banned)
        assert tensor.tolist() == list(toks)
        below = sorted(i for i, it in enumerate(items) if it[:d] == prefix)
        assert sorted(trie.items_below(node)) == below and trie.item_count[node] == len(below)
        assert cons.is_live(node) == any(i not in banned for i in below)
    # prefixes that no item has
    bogus = (max(t for it in items for t in it) + 1,)
    assert trie.node_of(bogus) is None and trie.item_of(items[0][:-1] + bogus) is None
    assert all(trie.item_of(it) == i for i, it in enumerate(items))


@settings(max_examples=80, **SETTINGS)
@given(cat=catalogues(), data=st.data())
def test_constraint_walk_matches_bruteforce(cat, data):
    """Walk a whole list through the state machine, checking allowed() against a catalogue scan at every step."""
    _, items = cat
    trie = ItemTrie(items)
    no_dup = data.draw(st.booleans())
    history = set(data.draw(st.lists(st.integers(0, len(items) - 1), max_size=3)))
    cons = ListConstraint(trie, history, no_duplicates=no_dup)
    banned = set(history)
    n_items = data.draw(st.integers(1, len(items) - len(history) if no_dup else 8))
    for k in range(n_items):
        prefix = []
        for _d in range(len(items[0])):
            expect = brute_allowed(items, prefix, banned)
            assert cons.allowed() == expect and cons.is_forced() == (len(expect) == 1)
            tok = data.draw(st.sampled_from(expect))
            for bad in set(range(max(expect) + 2)) - set(expect):
                assert not cons.is_allowed(bad)
            snapshot = cons.copy()
            cons.advance(tok)
            assert snapshot.allowed() == expect  # copies are independent
            prefix.append(tok)
        item = items.index(tuple(prefix))
        assert cons.completed_items[-1] == item and len(cons.completed_items) == k + 1
        if no_dup:
            banned.add(item)
        assert cons.allowed() == (SEP,) and cons.is_forced()
        with pytest.raises(PadrecError):
            cons.advance(prefix[-1])
        cons.advance(SEP)
        assert cons.at_item_start
    if no_dup and len(banned) == len(items):
        with pytest.raises(PadrecError):
            cons.allowed()


def test_exhausted_catalogue_raises():
    items = [(4, 6), (4, 7), (5, 6)]
    trie = ItemTrie(items)
    cons = ListConstraint(trie, [0, 1, 2])
    with pytest.raises(PadrecError):
        cons.allowed()
    with pytest.raises(PadrecError):
        make_constraint(trie, make_prompt(items, [0]), GenerationConfig(n_items=3, exclude_history=True))
    for bad in ([], [(4, 6), (4, 6)], [(4, 6), (5,)], [(3, 6)]):
        with pytest.raises(PadrecError):
            ItemTrie(bad)
    with pytest.raises(PadrecError):
        GenerationConfig(temperature=0)


# ------------------------------------------------------------------------------------------------------------
# the sampled distribution
# ------------------------------------------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(
    logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12),
    data=st.data(),
    temperature=st.floats(0.3, 2.0),
    top_k=st.integers(0, 6),
    top_p=st.floats(0.05, 1.0),
)
def test_logits_processing(logits, data, temperature, top_k, top_p):
    x = torch.tensor(logits, dtype=torch.float64)
    V = len(logits)
    allowed = sorted(data.draw(st.sets(st.integers(0, V - 1), min_size=1)))
    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    lp = apply_logits_processing(x, torch.tensor(allowed), cfg)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[allowed] = True
    lp_full = apply_logits_processing(x, mask, cfg)
    assert torch.allclose(lp, lp_full[allowed]) and torch.isinf(lp_full[~mask]).all()
    p = lp.exp()
    assert abs(float(p.sum()) - 1) < 1e-9
    kept = p > 0
    n = len(allowed)
    if 0 < top_k < n:  # ties at the k-th value may keep more
        assert int(kept.sum()) >= 1 and (int(kept.sum()) <= top_k or len(set(logits)) < V)
    # the kept set is a top set of the constrained logits
    sub = x[allowed]
    assert float(sub[kept].min()) >= float(sub[~kept].max()) if (~kept).any() else True
    if top_p == 1.0 and top_k == 0:
        ref = torch.log_softmax(sub / temperature, -1)
        assert torch.allclose(lp, ref)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert kept[int(sample_from_logprobs(lp, g))]


# ------------------------------------------------------------------------------------------------------------
# list-wise generation
# ------------------------------------------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(req=requests(max_prompts=4))
def test_generate_greedy_fast_equals_reference_and_batch(req):
    vocab, items, seed, histories, kw = req
    model = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    cfg = GenerationConfig(**kw)
    prompts = [make_prompt(items, h) for h in histories]
    fast = []
    for prompt, hist in zip(prompts, histories):
        ref = generate_list_reference(model, prompt, trie, cfg)
        res = generate_list(model, prompt, trie, cfg)
        assert res.tokens == ref.tokens and res.items == ref.items
        assert_valid(res, items, hist, cfg)
        # one model call per real decision, none for forced tokens
        cons = make_constraint(trie, prompt, cfg)
        decisions = 0
        for tok in ref.tokens:
            decisions += not cons.is_forced()
            cons.advance(tok)
        assert res.model_calls == decisions <= ref.model_calls == len(ref.tokens)
        fast.append(res)
    batch = generate_list_batch(model, prompts, trie, cfg, histories=histories, batch_size=3)
    assert [b.tokens for b in batch] == [f.tokens for f in fast]


@settings(max_examples=50, **SETTINGS)
@given(
    req=requests(),
    gen_seed=st.integers(0, 2**31),
    temperature=st.floats(0.5, 2.0),
    top_k=st.integers(0, 4),
    top_p=st.floats(0.3, 1.0),
)
def test_generate_sampling_fast_equals_reference(req, gen_seed, temperature, top_k, top_p):
    vocab, items, seed, histories, kw = req
    model = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    cfg = GenerationConfig(**kw, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    prompt = make_prompt(items, histories[0])
    ref = generate_list_reference(model, prompt, trie, cfg, torch.Generator().manual_seed(gen_seed))
    res = generate_list(model, prompt, trie, cfg, torch.Generator().manual_seed(gen_seed))
    assert res.tokens == ref.tokens
    assert_valid(res, items, histories[0], cfg)
    batch = generate_list_batch(
        model, [prompt, prompt], trie, cfg, histories=histories * 2, generator=torch.Generator().manual_seed(gen_seed)
    )
    for b in batch:
        assert_valid(b, items, histories[0], cfg)


def test_generate_float32_eager_smoke():
    """The default float32 path (eager attention) runs, stays valid, and uses fewer calls than the reference."""
    vocab = SIDVocab((3, 4, 2), "per_level")
    items = [vocab.item_tokens(c) for c in itertools.islice(itertools.product(range(3), range(4), range(2)), 0, 24, 2)]
    model = tiny_model(vocab.size, 0, torch.float32, "eager")
    trie = ItemTrie(items)
    cfg = GenerationConfig(n_items=5, exclude_history=True)
    hist = [0, 3]
    prompt = make_prompt(items, hist)
    ref = generate_list_reference(model, prompt, trie, cfg)
    res = generate_list(model, prompt, trie, cfg)
    (batch,) = generate_list_batch(model, [prompt], trie, cfg)
    for r in (ref, res, batch):
        assert_valid(r, items, hist, cfg)
    assert res.model_calls < ref.model_calls


# ------------------------------------------------------------------------------------------------------------
# beam search
# ------------------------------------------------------------------------------------------------------------
@settings(max_examples=50, **SETTINGS)
@given(req=requests(max_prompts=3), beam_size=st.integers(1, 8), top_k=st.integers(1, 8), excl=st.booleans())
def test_beam_fast_equals_reference_and_batch(req, beam_size, top_k, excl):
    vocab, items, seed, histories, _ = req
    model = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    prompts = [make_prompt(items, h) for h in histories]
    excludes = [h if excl else [] for h in histories]
    singles = []
    for prompt, ex in zip(prompts, excludes):
        fast = beam_search_items(model, prompt, trie, beam_size, top_k, exclude_items=ex)
        ref = beam_search_reference(model, prompt, trie, beam_size, top_k, exclude_items=ex)
        assert fast.items == ref.items
        assert fast.scores == pytest.approx(ref.scores, abs=1e-9)
        assert len(set(fast.items)) == len(fast.items) and not set(fast.items) & set(ex)
        assert fast.scores == sorted(fast.scores, reverse=True)
        assert fast.model_calls <= len(items[0])
        singles.append(fast)
    batch = beam_search_items_batch(model, prompts, trie, beam_size, top_k, batch_size=2, exclude_items=excludes)
    for b, s in zip(batch, singles):
        assert b.items == s.items
        assert b.scores == pytest.approx(s.scores, abs=1e-9)


@settings(max_examples=40, **SETTINGS)
@given(req=requests(), excl=st.booleans())
def test_wide_beam_equals_exhaustive(req, excl):
    vocab, items, seed, histories, _ = req
    model = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    prompt = make_prompt(items, histories[0])
    ex = histories[0] if excl else []
    full = enumerate_items_reference(model, prompt, trie, exclude_items=ex)
    beam = beam_search_items(model, prompt, trie, beam_size=len(items), top_k=len(items), exclude_items=ex)
    assert beam.items == full.items
    assert beam.scores == pytest.approx(full.scores, abs=1e-9)
    # constrained scores are a distribution over the non-excluded items
    assert math.fsum(math.exp(s) for s in full.scores) == pytest.approx(1.0, abs=1e-9)
    assert len(full.items) == len(items) - len(set(ex))


# ------------------------------------------------------------------------------------------------------------
# beam search: tree attention (one cache row per prompt, 4D additive masks)
# ------------------------------------------------------------------------------------------------------------
def forward_tolerance(dtype, attn: str) -> float:
    """How far two forwards of the same tokens may differ when they are fed in different shapes (one cache row with a
    tree of queries vs a cache-free forward): a few ulps of the precision the attention runs in, times the logits'
    size (|logit| <= ~5 here) and the 2 layers. float64 under sdpa computes in float64 throughout (eps 2e-16; 1e-9
    leaves 10^6 ulps). Eager attention casts its scores to float32 for the softmax whatever the model's dtype, so a
    float64 model on that path carries float32 rounding (eps 1.2e-7) and gets the float32 tolerance: how the softmax's
    sum is split into vector lanes depends on the row length and on the CPU's vector width (1.7e-6 seen on an AVX2
    kernel for this test; 1e-4 is 60 times that)."""
    return 1e-9 if dtype == torch.float64 and attn == "sdpa" else 1e-4


def _additive_mask(allow: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min).unsqueeze(1)


@pytest.mark.parametrize("dtype,attn", [(torch.float64, "sdpa"), (torch.float32, "eager"), (torch.float64, "eager")])
def test_model_forward_accepts_4d_tree_mask(dtype, attn):
    """model_forward with a 4D additive float mask (used as is by the HF forward): left-padded prefill, then two
    tree steps in which several branches of one cache row are fed as query tokens (a causal chain inside each
    branch, ancestors from the previous step). Every logit equals a cache-free forward of prompt + branch."""
    from padrec.decoding.autoregressive import left_pad, model_forward, new_cache

    model = tiny_model(20, 1, dtype, attn)
    tol = forward_tolerance(dtype, attn)
    prompts = [[BOS, 5, 6, 7, 8, 9], [BOS, 11, 12]]
    branches = [[[3, 4], [4, 3], [5, 5]], [[6, 7], [7, 6], [8, 9]]]  # 3 branches x 2 tokens per row
    nb, k = 3, 2
    ids, mask, pos = left_pad(prompts, "cpu")
    W = ids.shape[1]
    real = mask.bool()

    def full(seq):
        return model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]

    with torch.inference_mode():
        cache = new_cache(model)
        allow = torch.ones(W, W, dtype=torch.bool).tril()[None] & real[:, None, :] | torch.eye(W, dtype=torch.bool)
        logits, cache = model_forward(model, ids, cache, _additive_mask(allow, dtype), pos, last_only=False)
        for r, p in enumerate(prompts):
            assert torch.allclose(logits[r, W - len(p) :], full(p), atol=tol, rtol=0)
        # step 1: the 3 branches' 2-token chains as 6 query tokens of the row
        q = nb * k
        step_ids = torch.tensor([[t for br in row for t in br] for row in branches])
        allow = torch.zeros(2, q, W + q, dtype=torch.bool)
        allow[:, :, :W] = real[:, None, :]
        allow[:, :, W:] = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool)] * nb).tril()
        step_pos = torch.tensor([[len(p) + t for _ in range(nb) for t in range(k)] for p in prompts])
        logits, cache = model_forward(model, step_ids, cache, _additive_mask(allow, dtype), step_pos, last_only=False)
        for r, p in enumerate(prompts):
            for j, br in enumerate(branches[r]):
                for t in range(k):
                    ref = full(p + br[: t + 1])[-1]
                    assert torch.allclose(logits[r, j * k + t], ref, atol=tol, rtol=0)
        # step 2: one new token per branch; it sees the prompt, its branch's 2 ancestors (columns) and itself
        past = W + q
        new = [[1, 2, 3], [4, 5, 6]]
        allow = torch.zeros(2, nb, past + nb, dtype=torch.bool)
        allow[:, :, :W] = real[:, None, :]
        for j in range(nb):
            allow[:, j, W + j * k : W + (j + 1) * k] = True
            allow[:, j, past + j] = True
        step_pos = torch.tensor([[len(p) + k] * nb for p in prompts])
        logits, cache = model_forward(model, torch.tensor(new), cache, _additive_mask(allow, dtype), step_pos,
                                      last_only=False)
        for r, p in enumerate(prompts):
            for j, br in enumerate(branches[r]):
                assert torch.allclose(logits[r, j], full(p + br + [new[r][j]])[-1], atol=tol, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_beam_tree_forced_levels_padding_and_uneven_beams(attn):
    """Forced levels at the root (deferred into the prefill) and in the middle (deferred into the next call as a
    2-token chain per beam), left-padded prompts of different lengths, exclusions that leave rows with different
    numbers of live beams (padded query slots), beam_size above the number of live items. (Eager attention runs its
    softmax in float32 even for a float64 model, hence `forward_tolerance`'s float32 bound for scores there: up to
    9.5e-7 was seen on AVX-512 kernels, against 1e-6 before. The items' order stays exact: the reference's ranked
    scores are >= 0.017 apart, far beyond what float32 rounding can move.)"""
    vocab = SIDVocab((1, 3, 1, 2, 2), "per_level")  # levels 0 and 2 are forced for every beam
    items = [vocab.item_tokens(c) for c in itertools.product(range(1), range(3), range(1), range(2), range(2))]
    model = tiny_model(vocab.size, 2, torch.float64, attn)
    trie = ItemTrie(items)
    histories = [[], [0], [1, 2, 3, 4, 5], [7]]
    excludes = [[], list(range(9)), [5], list(range(12))[1:]]  # live items: 12, 3, 11, 1
    prompts = [make_prompt(items, h) for h in histories]
    for beam_size, top_k in ((1, 1), (2, 3), (5, 12), (16, 16)):
        batch = beam_search_items_batch(model, prompts, trie, beam_size, top_k, batch_size=3, exclude_items=excludes)
        for prompt, ex, b in zip(prompts, excludes, batch):
            ref = beam_search_reference(model, prompt, trie, beam_size, top_k, exclude_items=ex)
            assert b.items == ref.items
            assert b.scores == pytest.approx(ref.scores, abs=forward_tolerance(torch.float64, attn))
            assert not set(b.items) & set(ex)
            # calls: the prompt + the levels 1, 3, 4 (a real decision somewhere in the chunk); 0 and 2 are free
            assert b.model_calls <= 3 < ref.model_calls == 5
        single = beam_search_items(model, prompts[2], trie, beam_size, top_k, exclude_items=excludes[2])
        assert single.items == batch[2].items


def test_beam_tree_all_forced_catalogue():
    """A catalogue where a single item is left: every level forced, a single model call-free walk."""
    vocab = SIDVocab((2, 2), "per_level")
    items = [vocab.item_tokens(c) for c in itertools.product(range(2), range(2))]
    model = tiny_model(vocab.size, 0, torch.float64)
    trie = ItemTrie(items)
    res = beam_search_items(model, make_prompt(items, [1]), trie, 4, 4, exclude_items=[0, 1, 2])
    assert res.items == [3] and res.scores == [0.0] and res.model_calls == 0
    with pytest.raises(PadrecError):
        beam_search_items(model, make_prompt(items, []), trie, 4, 4, exclude_items=[0, 1, 2, 3])
    with pytest.raises(PadrecError):
        beam_search_items_batch(model, [[BOS]], trie, 0, 4)
