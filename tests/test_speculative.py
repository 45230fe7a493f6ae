"""Speculative decoding: tree attention is exact, greedy speculative generation equals autoregressive generation
for any draft, a perfect draft gets everything accepted, lists stay valid, and speculative sampling reproduces the
target's exact list distribution (chi-square against an enumeration of all lists).

Models run in float64 with sdpa (see tests/test_decoding.py for why), so "equal" means equal.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from helpers import FeatureRecordingDraft, perturb, pin_threads, random_acceptance, RandomLogitsDraft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from padrec import PadrecError
from padrec.decoding.autoregressive import GenerationConfig, apply_logits_processing, generate_list, make_constraint
from padrec.decoding.trie import ItemTrie
from padrec.speculative import (
    DraftTree,
    ModelDraft,
    SpecConfig,
    TargetSession,
    TreeConfig,
    speculative_generate,
)
from padrec.decoding.kv import keep_positions
from padrec.tokenizer.vocab import BOS, SEP, SIDVocab

pin_threads()
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=32)
def tiny_model(vocab_size: int, seed: int, hidden: int = 32, layers: int = 2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval().to(torch.float64)


def full_forward(model, tokens):
    """Logits [T, V] and last hidden states [T, d] of a plain, cache-free forward."""
    with torch.inference_mode():
        out = model.get_decoder()(input_ids=torch.tensor([tokens]))
        hidden = out.last_hidden_state[0]
        return model.get_output_embeddings()(hidden), hidden


# ------------------------------------------------------------------------------------------------------------
# test drafts
# ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def feature_draft(target, levels: int | None):
    """A random-weight EAGLE head (levels None) or PAD-Rec head with every part on, in float64."""
    from padrec.drafts.eagle import EagleDraft, EagleDraftModel
    from padrec.drafts.padrec import PadRecDraftModel, PositionConfig

    if levels is None:
        model = EagleDraftModel.from_target(target, seed=3)
    else:
        model = PadRecDraftModel.from_target(target, PositionConfig(levels=levels, trained_depths=3), seed=3)
    return EagleDraft(perturb(model, 5).to(torch.float64).eval(), name="padrec" if levels else "eagle")


def make_drafts(vocab_size: int, target, levels: int = 2):
    drafts = {
        "target": ModelDraft(target),
        "small-lm": ModelDraft(tiny_model(vocab_size, 100, hidden=16, layers=1)),
        "random": RandomLogitsDraft(vocab_size, seed=7),
        "features": FeatureRecordingDraft(target),
        "eagle": feature_draft(target, None),
        "padrec": feature_draft(target, levels),
    }
    for i, draft in enumerate(drafts.values()):  # for calibrated trees (draft-scored trees ignore it)
        draft.acceptance = random_acceptance(levels, i)
    return drafts


# ------------------------------------------------------------------------------------------------------------
# strategies / helpers (as in tests/test_decoding.py)
# ------------------------------------------------------------------------------------------------------------
@st.composite
def catalogues(draw, min_items=5, max_items=20):
    layout = draw(st.sampled_from(["per_level", "shared"]))
    sizes = draw(st.lists(st.integers(1, 4), min_size=2, max_size=3).filter(lambda s: math.prod(s) >= min_items))
    vocab = SIDVocab(tuple(sizes), layout)
    all_codes = list(itertools.product(*(range(s) for s in sizes)))
    n = draw(st.integers(min_items, min(max_items, len(all_codes))))
    perm = draw(st.permutations(range(len(all_codes))))
    return vocab, [vocab.item_tokens(all_codes[i]) for i in perm[:n]]


def make_prompt(items, history):
    return [BOS] + [t for i in history for t in (*items[i], SEP)]


@st.composite
def requests(draw):
    vocab, items = draw(catalogues())
    seed = draw(st.integers(0, 3))
    history = draw(st.lists(st.integers(0, len(items) - 1), max_size=4))
    no_dup, excl = draw(st.booleans()), draw(st.booleans())
    free = len(items) - (len(set(history)) if excl else 0)
    n_items = draw(st.integers(1, min(5, free) if no_dup else 5))
    return vocab, items, seed, history, dict(n_items=n_items, no_duplicates=no_dup, exclude_history=excl)


tree_shapes = st.one_of(
    st.builds(TreeConfig.chain, st.integers(1, 5)),
    st.builds(TreeConfig, st.just("tree"), st.integers(1, 5), st.integers(1, 4), st.integers(1, 20)),
    # scored by a (random) acceptance table instead of the draft's log-probs: only the shape may change
    st.builds(TreeConfig, st.just("tree"), st.integers(1, 5), st.integers(1, 4), st.integers(1, 20),
              st.just("calibrated"), st.sampled_from([0.0, 0.2, 0.6])),
)


def assert_valid(res, items, history, cfg: GenerationConfig):
    index = {t: i for i, t in enumerate(items)}
    L = len(items[0])
    assert len(res.items) == cfg.n_items and len(res.tokens) == cfg.n_items * (L + 1)
    for k, item in enumerate(res.items):
        chunk = res.tokens[k * (L + 1) : (k + 1) * (L + 1)]
        assert chunk[-1] == SEP and index.get(tuple(chunk[:-1])) == item
    if cfg.no_duplicates:
        assert len(set(res.items)) == len(res.items)
    if cfg.exclude_history:
        assert not set(res.items) & set(history)


def check_tree(tree: DraftTree, shape: TreeConfig, remaining: int):
    """Structural invariants of a built draft tree."""
    assert 1 <= len(tree) <= shape.budget
    cap = min(shape.depth, shape.budget, remaining)
    assert tree.max_depth <= cap and tree.propose_calls <= cap - 1
    for j, (tok, p, d) in enumerate(zip(tree.tokens, tree.parents, tree.depths)):
        assert p < j and d == (1 if p < 0 else tree.depths[p] + 1)
        assert tree.constraint_at(p).is_allowed(tok)  # only valid continuations
    for node, kids in tree.children.items():
        toks = [tree.tokens[c] for c in kids]
        assert len(set(toks)) == len(toks) and len(kids) <= shape.branching
        allowed, lp = tree.draft_logprobs[node]
        score = {t: float(lp[allowed.index(t)]) for t in toks}
        assert [(-score[t], t) for t in toks] == sorted((-score[t], t) for t in toks)  # proposal order
    if shape.kind == "chain":
        assert tree.depths == list(range(1, len(tree) + 1))


def draft_greedy_depth(tree: DraftTree) -> int:
    """How far the draft's own greedy path (constrained arg-max at each node) runs inside the tree."""
    node, depth = -1, 0
    while node in tree.draft_logprobs:
        allowed, lp = tree.draft_logprobs[node]
        best = allowed[int(lp.argmax())]
        child = tree.child_by_token(node).get(best)
        if child is None:
            break
        node, depth = child, depth + 1
    return depth


# ------------------------------------------------------------------------------------------------------------
# tree attention
# ------------------------------------------------------------------------------------------------------------
def random_tree(gen: torch.Generator, n: int, vocab: int) -> DraftTree:
    tree = DraftTree(root=None)
    for j in range(n):
        p = int(torch.randint(-1, j, (1,), generator=gen)) if j else -1
        tree.tokens.append(int(torch.randint(4, vocab, (1,), generator=gen)))
        tree.parents.append(p)
        tree.depths.append(1 if p < 0 else tree.depths[p] + 1)
    return tree


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "hf"])
@pytest.mark.parametrize("seed", range(4))
def test_tree_verify_equals_sequential(seed, fast):
    gen = torch.Generator().manual_seed(seed)
    V = 13
    model = tiny_model(V, seed % 2)
    ctx = [BOS] + torch.randint(4, V, (5,), generator=gen).tolist()
    sess = TargetSession(model, fast=fast)
    assert sess.fast == fast
    logits0, feats0 = sess.prefill(ctx[:3])
    ref_l, ref_h = full_forward(model, ctx[:3])
    assert torch.allclose(logits0, ref_l[-1], atol=1e-9) and torch.allclose(feats0, ref_h, atol=1e-9)
    seq = ctx[:3]
    for rnd in range(3):
        pending = ctx[3:] if rnd == 0 else [int(torch.randint(4, V, (1,), generator=gen))]
        tree = random_tree(gen, 7 + rnd, V)
        logits, feats = sess.verify(pending, tree)
        m = len(pending)
        full_l, full_h = full_forward(model, seq + pending)
        assert torch.allclose(logits[:m], full_l[len(seq) :], atol=1e-9)
        assert torch.allclose(feats[:m], full_h[len(seq) :], atol=1e-9)
        for j in range(len(tree)):
            path = tree.path_tokens(j)
            pl, ph = full_forward(model, seq + pending + path)
            assert torch.allclose(logits[m + j], pl[-1], atol=1e-9)
            assert torch.allclose(feats[m + j], ph[-1], atol=1e-9)
        # keep a root-to-node path (the deepest node's), continue from it
        leaf = max(range(len(tree)), key=lambda j: (tree.depths[j], -j))
        nodes = []
        while leaf >= 0:
            nodes.append(leaf)
            leaf = tree.parents[leaf]
        nodes.reverse()
        sess.keep(nodes)
        seq = seq + pending + [tree.tokens[j] for j in nodes]
        assert sess.length == len(seq) == sess.cached_length()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fast", [True, False], ids=["fused", "hf"])
def test_model_draft_session_tree_equals_sequential(seed, fast):
    gen = torch.Generator().manual_seed(seed)
    V = 11
    model = tiny_model(V, seed)
    sess = ModelDraft(model, fast=fast).new_session()
    assert sess.fast == fast
    seq = [BOS] + torch.randint(4, V, (4,), generator=gen).tolist()
    out = sess.commit(seq, None)
    assert torch.allclose(out, full_forward(model, seq)[0][-1], atol=1e-9)
    for _rnd in range(2):
        tree = random_tree(gen, 9, V)
        # feed the nodes in 3 propose calls (parents always in an earlier call or earlier in the same call)
        cuts = [0, 3, 6, 9]
        for a, b in zip(cuts, cuts[1:]):
            logits = sess.propose(tree.parents[a:b], tree.tokens[a:b], tree.depths[a:b])
            for j in range(a, b):
                assert torch.allclose(logits[j - a], full_forward(model, seq + tree.path_tokens(j))[0][-1], atol=1e-9)
        sess.rollback()
        assert sess.cached_length() == len(seq)
        more = torch.randint(4, V, (2,), generator=gen).tolist()
        out = sess.commit(more, None)
        seq = seq + more
        assert torch.allclose(out, full_forward(model, seq)[0][-1], atol=1e-9)
    # a chain, one node per call (the fused path's unmasked case), then a fork below its first node
    chain = torch.randint(4, V, (4,), generator=gen).tolist()
    for j, tok in enumerate(chain):
        logits = sess.propose([j - 1], [tok], [j + 1])
        assert torch.allclose(logits[0], full_forward(model, seq + chain[: j + 1])[0][-1], atol=1e-9)
    logits = sess.propose([0], [7], [2])
    assert torch.allclose(logits[0], full_forward(model, seq + [chain[0], 7])[0][-1], atol=1e-9)
    sess.rollback()
    with pytest.raises(PadrecError):
        sess.propose([-1], [5], [2])  # depth inconsistent with its parent


def test_keep_positions_gathers():
    cache = DynamicCache()
    k = torch.arange(2 * 10 * 3, dtype=torch.float64).view(1, 2, 10, 3)
    cache.update(k.clone(), -k.clone(), 0)
    keep_positions(cache, [0, 1, 2, 5, 7])
    assert torch.equal(cache.layers[0].keys, k[:, :, [0, 1, 2, 5, 7]])
    assert torch.equal(cache.layers[0].values, -k[:, :, [0, 1, 2, 5, 7]])
    keep_positions(cache, [0, 1])
    assert cache.get_seq_length() == 2
    with pytest.raises(PadrecError):
        keep_positions(cache, [1, 0])


# ------------------------------------------------------------------------------------------------------------
# greedy: lossless for any draft
# ------------------------------------------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(req=requests(), shape=tree_shapes)
def test_greedy_speculative_equals_autoregressive(req, shape):
    vocab, items, seed, history, kw = req
    target = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    cfg = GenerationConfig(**kw)
    prompt = make_prompt(items, history)
    ref = generate_list(target, prompt, trie, cfg)
    L = len(items[0])
    total = cfg.n_items * (L + 1)
    for name, draft in make_drafts(vocab.size, target, vocab.levels).items():
        res = speculative_generate(target, draft, prompt, trie, cfg, SpecConfig(tree=shape, trace=True))
        assert res.tokens == ref.tokens and res.items == ref.items, name
        assert_valid(res, items, history, cfg)
        # every round makes at least one real decision; the feature path prefills the prompt once more
        assert res.target_calls <= ref.model_calls + (1 if draft.uses_target_features and len(prompt) > 1 else 0)
        assert len(res.accepted_per_round) == len(res.trace)
        for rnd in res.trace:
            check_tree(rnd["tree"], shape, total - rnd["start"])
            if name in ("target", "features"):
                # a perfect draft: everything on the target's path that the tree holds is accepted
                # (a calibrated tree may rank a draft's second choice first and keep only that)
                assert len(rnd["path"]) == draft_greedy_depth(rnd["tree"]) >= (shape.score == "draft")
                if shape.kind == "chain":
                    assert len(rnd["path"]) == min(shape.depth, total - rnd["start"])
        if name == "features":
            full_h = full_forward(target, prompt + res.tokens)[1]
            pos = 0
            for toks, feats in draft.log:
                for i, tok in enumerate(toks):
                    assert tok == (prompt + res.tokens)[pos]
                    expect = torch.zeros_like(feats[i]) if pos == 0 else full_h[pos - 1]
                    assert torch.allclose(feats[i], expect, atol=1e-9)
                    pos += 1
            draft.log.clear()
        st_ = res.stats
        assert st_["rounds"] == len(res.accepted_per_round)
        for att, acc in st_["accept_by_depth"] + st_["accept_by_slot"]:
            assert 0 <= acc <= att
        assert sum(acc for _, acc in st_["accept_by_depth"]) == sum(res.accepted_per_round)


def test_fully_forced_list_and_errors():
    vocab = SIDVocab((2, 2), "per_level")
    items = [vocab.item_tokens((1, 0))]
    target = tiny_model(vocab.size, 0)
    trie = ItemTrie(items)
    cfg = GenerationConfig(n_items=3, no_duplicates=False)
    res = speculative_generate(target, ModelDraft(target), [BOS], trie, cfg)
    assert res.tokens == generate_list(target, [BOS], trie, cfg).tokens and res.target_calls == 0
    with pytest.raises(PadrecError):
        speculative_generate(target, RandomLogitsDraft(vocab.size + 1), [BOS], trie, cfg)
    with pytest.raises(PadrecError):
        TreeConfig(kind="bush")
    with pytest.raises(PadrecError):
        TreeConfig(depth=0)


# ------------------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------------------
@settings(max_examples=20, **SETTINGS)
@given(
    req=requests(),
    shape=tree_shapes,
    gen_seed=st.integers(0, 2**31),
    temperature=st.floats(0.5, 2.0),
    top_k=st.integers(0, 4),
    top_p=st.floats(0.3, 1.0),
)
def test_sampling_valid_and_reproducible(req, shape, gen_seed, temperature, top_k, top_p):
    vocab, items, seed, history, kw = req
    target = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    cfg = GenerationConfig(**kw, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    prompt = make_prompt(items, history)
    for name, draft in make_drafts(vocab.size, target, vocab.levels).items():
        runs = [
            speculative_generate(
                target, draft, prompt, trie, cfg, SpecConfig(tree=shape), torch.Generator().manual_seed(gen_seed)
            )
            for _ in range(2)
        ]
        assert runs[0].tokens == runs[1].tokens, name
        assert_valid(runs[0], items, history, cfg)


def test_chi2_survival_function():
    # chi2 sf via the regularised upper incomplete gamma: known values
    for df, x, p in [(1, 3.841458820694124, 0.05), (10, 18.307038053275146, 0.05), (4, 1.0, 0.9097959895689501)]:
        got = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2)))
        assert math.isclose(got, p, rel_tol=1e-6)


def exact_list_distribution(model, prompt, trie, cfg) -> dict[tuple[int, ...], float]:
    """P(list) under autoregressive sampling from the target: the product of the processed probabilities."""
    total = cfg.n_items * (trie.levels + 1)
    out: dict[tuple[int, ...], float] = {}

    def rec(prefix, cons, prob):
        if len(prefix) == total:
            out[tuple(prefix)] = prob
            return
        toks, tensor = cons.allowed_with_tensor()
        if len(toks) == 1:
            probs = [1.0]
        else:
            logits = full_forward(model, prompt + prefix)[0][-1]
            probs = apply_logits_processing(logits, tensor, cfg).exp().tolist()
        for tok, p in zip(toks, probs):
            if p > 0:
                nxt = cons.copy()
                nxt.advance(tok)
                rec(prefix + [tok], nxt, prob * p)

    rec([], make_constraint(trie, prompt, cfg), 1.0)
    return out


@pytest.mark.parametrize(
    "sample_kw, shape, draft_kind",
    [
        (dict(), TreeConfig(depth=3, top_k=2, total_tokens=5), "random"),
        (dict(temperature=0.7, top_p=0.9), TreeConfig(depth=3, top_k=3, total_tokens=6), "random"),
        (dict(top_k=3), TreeConfig.chain(3), "small-lm"),
        (dict(temperature=0.9), TreeConfig(depth=3, top_k=2, total_tokens=5), "padrec"),
    ],
)
def test_speculative_sampling_matches_target_distribution(sample_kw, shape, draft_kind):
    vocab = SIDVocab((3, 2), "per_level")
    items = [vocab.item_tokens(c) for c in [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]]
    target = tiny_model(vocab.size, 3, hidden=16, layers=1)
    trie = ItemTrie(items)
    cfg = GenerationConfig(n_items=2, do_sample=True, **sample_kw)
    prompt = make_prompt(items, [1])
    exact = exact_list_distribution(target, prompt, trie, cfg)
    assert math.isclose(sum(exact.values()), 1.0, abs_tol=1e-9)
    draft = make_drafts(vocab.size, target)[draft_kind]
    gen = torch.Generator().manual_seed(1234)
    n = 2000
    counts: dict[tuple[int, ...], int] = {}
    rejected = 0
    for _ in range(n):
        res = speculative_generate(target, draft, prompt, trie, cfg, SpecConfig(tree=shape), gen)
        key = tuple(res.tokens)
        assert key in exact, "sampled a list of probability 0"
        counts[key] = counts.get(key, 0) + 1
        rejected += sum(att - acc for att, acc in res.stats["accept_by_depth"])
    assert rejected > n // 10  # the draft is wrong often: the residual path is exercised
    # chi-square, cells with an expected count below 5 pooled
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for key, p in exact.items():
        if p * n >= 5:
            obs.append(counts.get(key, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(key, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    exp = [e * n / sum(exp) for e in exp]  # renormalise rounding
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    pvalue = float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), torch.tensor(stat / 2)))  # chi2 sf
    assert len(obs) >= 5 and pvalue > 1e-3, (pvalue, obs, exp)
