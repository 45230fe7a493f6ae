"""Acceptance calibration (speculative/calibration.py): the fitted table recovers known rates, files round-trip and
refuse stale or malformed content, and a calibrated tree keeps the draft's candidates and order (only the scores
change), so it stays lossless - the property tests in test_speculative.py run calibrated trees too."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import random_acceptance

from padrec import PadrecError
from padrec.decoding.autoregressive import GenerationConfig
from padrec.decoding.trie import ItemTrie
from padrec.speculative.calibration import RANKS, AcceptanceModel, fit_acceptance
from padrec.speculative.tree import TreeConfig, build_tree
from padrec.tokenizer.vocab import SIDVocab


def test_fit_recovers_rates_by_slot_and_margin():
    rng = random.Random(0)
    samples = []
    for _ in range(4000):
        m = rng.uniform(0, 2)
        # slot 0: the top candidate is taken 50% of the time below margin 1, always above; else rank 1
        samples.append((0, m, 0 if m > 1 or rng.random() < 0.5 else 1))
        samples.append((1, m, rng.choice([0, 0, 0, 2])))  # slot 1: 3/4 rank 0, 1/4 rank 2, margin irrelevant
    model = fit_acceptance(samples, levels=2, buckets=4)
    assert model.samples == [4000, 4000]
    assert len(model.edges[0]) == 3 and model.edges[0] == sorted(model.edges[0])
    low = [math.exp(x) for x in model.rank_logprobs(0, 0.2, 3)]
    high = [math.exp(x) for x in model.rank_logprobs(0, 1.9, 3)]
    assert low[0] == pytest.approx(0.5, abs=0.05) and low[1] == pytest.approx(0.5, abs=0.05)
    assert high[0] > 0.98 and high[1] < 0.01
    mid = [math.exp(x) for x in model.rank_logprobs(1, 1.0, 3)]
    assert mid[0] == pytest.approx(0.75, abs=0.05) and mid[2] == pytest.approx(0.25, abs=0.05)
    # every score is a log-probability, deeper ranks included (what keeps the budget selection ancestor-closed)
    assert all(x <= 0 for s in (0, 1) for m in (0.0, 5.0, math.inf) for x in model.rank_logprobs(s, m, 8))
    assert [round(x, 2) for x in model.top_accept()] == [pytest.approx(0.75, abs=0.05), pytest.approx(0.75, abs=0.05)]


def test_few_samples_give_fewer_buckets_and_an_unseen_slot_is_uniform():
    model = fit_acceptance([(0, 0.1 * i, 0) for i in range(50)], levels=2, buckets=4, min_per_bucket=40)
    assert model.edges == [[], []]
    assert model.probs[0][0][0] > 0.9  # add-half smoothing keeps it below 1
    assert model.probs[1][0] == pytest.approx([1 / (RANKS + 1)] * RANKS)


def test_files_round_trip_and_refuse_bad_content(tmp_path):
    model = random_acceptance(3, 1)
    model = AcceptanceModel(**{**model.to_dict(), "weights_sha256": "abc"})
    f = tmp_path / "acceptance.json"
    model.save(f)
    assert AcceptanceModel.load(f, weights_sha256="abc") == model
    with pytest.raises(PadrecError, match="other draft weights"):
        AcceptanceModel.load(f, weights_sha256="def")
    d = json.loads(f.read_text())
    d["probs"] = d["probs"][:1]
    f.write_text(json.dumps(d))
    with pytest.raises(PadrecError, match="malformed"):
        AcceptanceModel.load(f)
    f.write_text("{not json")
    with pytest.raises(PadrecError, match="cannot read"):
        AcceptanceModel.load(f)


def test_tree_specs_parse_with_cal():
    trees = TreeConfig.parse_list("4", "10,2,14,cal;5,4,24;16,1,16,cal@0.3")
    assert [t.label for t in trees] == ["chain4", "tree10x2/14cal", "tree5x4/24", "tree16x1/16cal@0.3"]
    assert trees[1].score == "calibrated" and trees[2].score == "draft" and trees[3].min_accept == 0.3
    for bad in ("10,2,14,xyz", "10,2,14,cal0.3", "10,2,14,cal@x", "10,2,14,cal@1.5"):
        with pytest.raises(PadrecError):
            TreeConfig.parse_list(None, bad)
    with pytest.raises(PadrecError):
        TreeConfig(score="confidence")
    with pytest.raises(PadrecError):
        TreeConfig(min_accept=0.2)  # a threshold on draft log-probs would mean nothing


def test_calibrated_tree_keeps_candidates_and_order_and_scores_by_the_table():
    from padrec.decoding.autoregressive import make_constraint

    vocab = SIDVocab((4, 4), "per_level")
    rng = random.Random(0)
    trie = ItemTrie([vocab.item_tokens(c) for c in sorted({(rng.randrange(4), rng.randrange(4)) for _ in range(12)})])
    cfg = GenerationConfig(n_items=3)
    cons = make_constraint(trie, [1], cfg, None)
    gen = torch.Generator().manual_seed(3)

    def propose_fn():
        g = torch.Generator().manual_seed(5)
        return lambda parents, tokens, depths: torch.randn(len(tokens), vocab.size, generator=g)

    root = torch.randn(vocab.size, generator=gen)
    acc = random_acceptance(2, 7)
    shape = TreeConfig(depth=4, top_k=3, total_tokens=40)  # a budget that keeps every candidate
    plain = build_tree(root, cons, cfg, shape, propose_fn())
    cal = build_tree(root, cons, cfg, TreeConfig(depth=4, top_k=3, total_tokens=40, score="calibrated"),
                     propose_fn(), acceptance=acc)
    # level 1 is the same whatever the scores: the draft's top-3 at the root, in draft order
    assert [cal.tokens[c] for c in cal.children[-1]] == [plain.tokens[c] for c in plain.children[-1]]
    toks, lp = cal.draft_logprobs[-1]
    vals = sorted(lp.tolist(), reverse=True)
    expect = acc.rank_logprobs(cons.position, vals[0] - vals[1], 3)
    assert [cal.scores[c] for c in cal.children[-1]] == pytest.approx(expect)
    for j, p in enumerate(cal.parents):  # cumulative: never above the parent's
        assert p < 0 or cal.scores[j] <= cal.scores[p]
    with pytest.raises(PadrecError, match="calibrate"):
        build_tree(root, cons, cfg, TreeConfig(depth=4, top_k=3, total_tokens=40, score="calibrated"), propose_fn())


def test_min_accept_cuts_levels_and_nodes_below_the_threshold():
    from padrec.decoding.autoregressive import make_constraint

    vocab = SIDVocab((4, 4), "per_level")
    trie = ItemTrie([vocab.item_tokens((a, b)) for a in range(4) for b in range(4)])
    cfg = GenerationConfig(n_items=3)
    cons = make_constraint(trie, [1], cfg, None)
    # every non-forced node: the top candidate is taken with probability 0.5, the second with 0.25
    acc = AcceptanceModel(levels=2, edges=[[], []], probs=[[[0.5, 0.25, 0.1, 0.05]]] * 2, samples=[1, 1])
    calls = []

    def propose(parents, tokens, depths):
        calls.append(len(tokens))
        return torch.zeros(len(tokens), vocab.size)

    def build(min_accept, top_k=1):
        calls.clear()
        shape = TreeConfig(depth=6, top_k=top_k, total_tokens=6 * top_k, score="calibrated", min_accept=min_accept)
        return build_tree(torch.zeros(vocab.size), cons, cfg, shape, propose, acceptance=acc)

    full = build(0.0)
    assert len(full) == 6 and len(calls) == 5  # a full chain: level 1, 2 (0.5, 0.25), SEP (forced, 0.25), ...
    cut = build(0.2)  # keeps 0.5, 0.25, 0.25 (SEP is free), stops before 0.125
    assert [round(math.exp(s), 3) for s in cut.scores] == [0.5, 0.25, 0.25]
    assert len(calls) == 2  # SEP's children (a new item: at best 0.25 * 0.5) are not even drafted
    single = build(0.6)  # nothing reaches 0.6: the best node is kept anyway, nothing is expanded
    assert len(single) == 1 and calls == []
    wide = build(0.2, top_k=2)
    assert min(math.exp(s) for s in wide.scores) >= 0.2 - 1e-12


def test_best_logprob_bounds_every_rank_and_margin():
    for seed in range(20):
        model = random_acceptance(3, seed)  # random tables: rank 1 may well beat rank 0
        for slot in range(3):
            bound = model.best_logprob(slot)
            for margin in (0.0, 0.1, 0.5, 1.0, 1.5, 3.0, math.inf):
                assert max(model.rank_logprobs(slot, margin, 8)) <= bound + 1e-12
