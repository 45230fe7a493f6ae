"""Speculative beam search: strict verification returns exactly plain constrained beam search (items, order, scores)
for any draft, a perfect draft gets every drafted level accepted, relaxed verification returns K valid items.

Models run in float64 with sdpa (see tests/test_decoding.py): the speculative forwards have other shapes than plain
beam search's, and only float64 makes "equal" mean equal, ties included.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import FeatureRecordingDraft, pin_threads, RandomLogitsDraft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from padrec import PadrecError
from padrec.decoding.beam import beam_search_items
from padrec.decoding.trie import ItemTrie
from padrec.drafts.base import Draft
from padrec.drafts.eagle import EagleDraft, EagleDraftModel
from padrec.speculative import ModelDraft
from padrec.speculative.beam import BeamSpecConfig, speculative_beam_search
from padrec.tokenizer.vocab import BOS, SEP, SIDVocab

pin_threads()
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=32)
def tiny_model(vocab_size: int, seed: int, hidden: int = 32, layers: int = 2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                      initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().to(torch.float64)


def feature_target_draft(model):
    """The target as an EAGLE-family draft (the target goes first), checking the feature convention on commit."""

    def check(tokens, features):
        with torch.inference_mode():
            hidden = model.get_decoder()(input_ids=torch.tensor([list(tokens)])).last_hidden_state[0]
        assert torch.allclose(features[1:], hidden[:-1], atol=1e-9) and not features[0].any()

    return FeatureRecordingDraft(model, check)


def make_drafts(vocab: int, target) -> dict[str, Draft]:
    torch.manual_seed(7)
    eagle = EagleDraftModel.from_target(target, seed=3).to(torch.float64)
    return {
        "target": ModelDraft(target),
        "features": feature_target_draft(target),
        "small-lm": ModelDraft(tiny_model(vocab, 11, hidden=16, layers=1)),
        "random": RandomLogitsDraft(vocab),
        "eagle-random": EagleDraft(eagle),
    }


@st.composite
def catalogues(draw, min_items=4, max_items=30):
    levels = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=levels, max_size=levels).filter(
        lambda s: math.prod(s) >= min_items))
    vocab = SIDVocab(tuple(sizes), "per_level")
    codes = []
    for _ in range(draw(st.integers(min_items, min(max_items, math.prod(sizes))))):
        codes.append(tuple(draw(st.integers(0, s - 1)) for s in sizes))
    codes = sorted(set(codes))
    return vocab, [vocab.item_tokens(c) for c in codes]


def make_prompt(items, history):
    return [BOS] + [t for i in history for t in (*items[i], SEP)]


@st.composite
def searches(draw):
    vocab, items = draw(catalogues())
    history = draw(st.lists(st.integers(0, len(items) - 1), max_size=4))
    excl = draw(st.booleans()) and len(set(history)) < len(items)
    k = draw(st.integers(1, 8))
    n = draw(st.integers(k, k + 6))
    gamma = draw(st.integers(1, 4))
    return vocab, items, draw(st.integers(0, 3)), history, (history if excl else []), k, n, gamma


@settings(max_examples=40, **SETTINGS)
@given(req=searches())
def test_strict_equals_plain_beam_search(req):
    vocab, items, seed, history, excl, K, N, gamma = req
    target = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    prompt = make_prompt(items, history)
    plain = beam_search_items(target, prompt, trie, K, K, exclude_items=excl)
    cfg = BeamSpecConfig(beam_size=K, draft_beams=N, gamma=gamma, trace=True)
    for name, draft in make_drafts(vocab.size, target).items():
        res = speculative_beam_search(target, draft, prompt, trie, cfg, exclude_items=excl)
        assert res.items == plain.items, name
        assert res.scores == pytest.approx(plain.scores, abs=1e-9), name
        assert res.target_calls <= plain.model_calls, name
        for att, acc in res.stats["accept_by_depth"]:
            assert 0 <= acc <= att
        if name in ("target", "features"):
            # a perfect draft: every drafted level holds the target's beams
            assert all(rnd["accepted"] == len(rnd["drafted"]) for rnd in res.trace), name
            if name == "target" and gamma >= trie.levels - 1:
                assert res.target_calls <= 1
        for rnd in res.trace:
            for lv in rnd["drafted"]:
                assert len(set(lv)) == len(lv) <= N
                assert all(trie.node_of(seq) is not None for seq in lv)


def four_level_catalogue(seed: int):
    """Up to 60 random items with 4 levels (4x4x3x2 codes): deep enough for γ = 3 drafted levels."""
    sizes = (4, 4, 3, 2)
    vocab = SIDVocab(sizes, "per_level")
    gen = torch.Generator().manual_seed(seed)
    codes = sorted({tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in sizes) for _ in range(60)})
    return vocab, [vocab.item_tokens(c) for c in codes]


def test_perfect_draft_needs_one_forward():
    """With L = 4 and gamma = 3 the target-as-draft certifies all four levels in one forward, for every K <= N."""
    vocab, items = four_level_catalogue(seed=0)
    target = tiny_model(vocab.size, 5)
    trie = ItemTrie(items)
    prompt = make_prompt(items, [0, 3, 7])
    for K, N in ((1, 6), (3, 3), (5, 12), (8, 20)):
        plain = beam_search_items(target, prompt, trie, K, K)
        res = speculative_beam_search(target, ModelDraft(target), prompt, trie,
                                      BeamSpecConfig(beam_size=K, draft_beams=N, gamma=3))
        assert res.items == plain.items and res.target_calls == 1 and plain.model_calls >= 3
        assert res.stats["tau"] == 4.0
        assert all(acc == att == 1 for att, acc in res.stats["accept_by_depth"])


def test_near_ties_defer_to_plain_beam_search(monkeypatch):
    """A choice that float rounding could flip is left to plain beam search itself: with a tolerance that calls
    every choice a near-tie, each search falls back and returns plain's items and scores exactly; a real tolerance
    on a float64 target does not fall back here."""
    import padrec.speculative.beam as sb

    assert sb._near_tie(torch.tensor([-1.0, -1.00001, -3.0, float("-inf")]), 1, 1e-4)  # gap at the top-1 boundary
    assert not sb._near_tie(torch.tensor([-1.0, -1.5, -3.0, float("-inf")]), 2, 1e-4)
    assert not sb._near_tie(torch.tensor([-1.0, float("-inf")]), 1, 1e-4)  # one finite candidate: nothing to flip
    vocab, items = four_level_catalogue(seed=1)
    target = tiny_model(vocab.size, 6)
    trie = ItemTrie(items)
    prompt = make_prompt(items, [1, 2])
    cfg = BeamSpecConfig(beam_size=4, draft_beams=8, gamma=2)
    plain = beam_search_items(target, prompt, trie, 4, 4)
    res = speculative_beam_search(target, ModelDraft(target), prompt, trie, cfg)
    assert res.items == plain.items and not res.stats["near_tie_fallback"]
    monkeypatch.setattr(sb, "near_tie_tolerance", lambda model: float("inf"))
    res = speculative_beam_search(target, ModelDraft(target), prompt, trie, cfg)
    assert res.stats["near_tie_fallback"] and res.items == plain.items and res.scores == plain.scores
    assert res.target_calls == res.stats["target_forwards"] + plain.model_calls


@settings(max_examples=15, **SETTINGS)
@given(req=searches(), gen_seed=st.integers(0, 2**31))
def test_relaxed_returns_k_valid_distinct_items(req, gen_seed):
    vocab, items, seed, history, excl, K, N, gamma = req
    target = tiny_model(vocab.size, seed)
    trie = ItemTrie(items)
    prompt = make_prompt(items, history)
    live = len(items) - len(set(excl))
    cfg = BeamSpecConfig(beam_size=K, draft_beams=N, gamma=gamma, verify="relaxed")
    for name, draft in make_drafts(vocab.size, target).items():
        runs = [speculative_beam_search(target, draft, prompt, trie, cfg, excl, torch.Generator().manual_seed(gen_seed))
                for _ in range(2)]
        res = runs[0]
        assert res.items == runs[1].items, name  # reproducible from the generator
        assert len(res.items) == min(K, live) and len(set(res.items)) == len(res.items), name
        assert not set(res.items) & set(excl)
        assert res.scores == sorted(res.scores, reverse=True)
        # each score is the item's target log-probability (the same numbers strict mode ranks)
        full = beam_search_items(target, prompt, trie, len(items), len(items), exclude_items=excl)
        by_item = dict(zip(full.items, full.scores))
        assert res.scores == pytest.approx([by_item[i] for i in res.items], abs=1e-9)


def test_relaxed_with_perfect_draft_is_close_to_plain():
    """p = q for the target-as-draft, so every drafted node passes the ratio test; the K beams are then random
    picks among the N sampled nodes - a sampled list, which overlaps the plain top-K but need not equal it."""
    vocab = SIDVocab((5, 5, 4), "per_level")
    items = [vocab.item_tokens((a, b, c)) for a in range(5) for b in range(5) for c in range(4) if (a + b + c) % 3]
    target = tiny_model(vocab.size, 2)
    trie = ItemTrie(items)
    prompt = make_prompt(items, [1, 4])
    plain = beam_search_items(target, prompt, trie, 5, 5)
    cfg = BeamSpecConfig(beam_size=5, draft_beams=8, gamma=2, verify="relaxed")
    overlap = 0
    for s in range(20):
        res = speculative_beam_search(target, ModelDraft(target), prompt, trie, cfg,
                                      generator=torch.Generator().manual_seed(s))
        assert res.stats["resampled"] == 0 and res.target_calls == 1
        overlap += len(set(res.items) & set(plain.items))
    assert overlap > 20  # far better than 5 random items of 66 (expected overlap ~0.4 per run)
    # near-zero temperature and N = K: sampling without replacement takes the K best, i.e. plain beam search,
    # whatever the draft (p underflows for all but the best node, the rest come from the refill)
    cold = BeamSpecConfig(beam_size=5, draft_beams=5, gamma=2, verify="relaxed", temperature=1e-7)
    for name, draft in make_drafts(vocab.size, target).items():
        res = speculative_beam_search(target, draft, prompt, trie, cold, generator=torch.Generator().manual_seed(0))
        assert res.items == plain.items, name


def test_config_and_draft_errors():
    vocab = SIDVocab((2, 2), "per_level")
    items = [vocab.item_tokens((a, b)) for a in range(2) for b in range(2)]
    target = tiny_model(vocab.size, 0)
    with pytest.raises(PadrecError):
        BeamSpecConfig(beam_size=5, draft_beams=4)
    with pytest.raises(PadrecError):
        BeamSpecConfig(verify="loose")
    with pytest.raises(PadrecError):
        BeamSpecConfig(verify="relaxed", temperature=0.0)
    with pytest.raises(PadrecError):
        speculative_beam_search(target, RandomLogitsDraft(vocab.size + 1), [BOS], ItemTrie(items))
    # a fully forced search (one live item) makes no model call at all
    res = speculative_beam_search(target, ModelDraft(target), [BOS], ItemTrie(items),
                                  BeamSpecConfig(beam_size=2, draft_beams=2), exclude_items=[0, 1, 2])
    assert res.items == [3] and res.target_calls == 0 and res.scores == [0.0]


def test_bench_beam_mode_through_the_cli(synth_env, trained_run, tmp_path):
    import json
    import shutil

    from padrec.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train-draft", "--run", str(run), "--kind", "lm", "--epochs", "1", "--threads", "1"]) == 0
    out = tmp_path / "beam.json"
    rc = main(["bench", "--run", str(run), "--mode", "beam", "--drafts", "lm", "--users", "5", "--warmup", "1",
               "--beam-k", "3,5", "--draft-beams", "6", "--gamma", "1,2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["mode"], r["K"]) for r in rows if r["mode"] == "plain"] == [("plain", 3), ("plain", 5)]
    assert len(rows) == 2 * (1 + 2 * 2)  # per K: plain + {strict, relaxed} x {gamma 1, 2}
    for r in rows:
        assert 1.0 <= r["tau"] <= result["levels"] and r["median_ms"] > 0
        if r["mode"] in ("plain", "strict"):
            assert r["exact_users"] == "5/5" and r["max_score_diff"] < 1e-4, r
        if r["mode"] != "plain":
            assert r["N"] == 6 and all(x is None or 0.0 <= x <= 1.0 for x in r["accept_by_depth"])
    assert main(["bench", "--run", str(run), "--mode", "beam", "--drafts", "lm", "--verify", "loose"]) == 2
