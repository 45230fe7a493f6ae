"""Top-K alignment losses (AtSpeed-S / AtSpeed-R) and the beam teacher that feeds them."""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import pin_threads
from padrec import PadrecError
from padrec.decoding.beam import beam_search_items
from padrec.decoding.trie import ItemTrie
from padrec.drafts.alignment import (
    BeamAligner,
    alignment_loss,
    density_regulariser,
    relaxed_alignment_loss,
    reverse_kl_topk,
    strict_alignment_loss,
)
from padrec.drafts.train import DraftTrainConfig, draft_loss
from padrec.tokenizer.vocab import BOS, SEP, SIDVocab

pin_threads()


def _logits(n=6, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, v, generator=g, dtype=torch.float64)


def _allowed(n=6, v=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, v, generator=g) < 0.6
    mask[:, 0] = True
    mask[-1] = False
    mask[-1, 3] = True  # a forced position: skipped by the losses
    return mask


def test_relaxed_is_total_variation_on_allowed_tokens():
    d, t, a = _logits(seed=0), _logits(seed=1), _allowed()
    got = relaxed_alignment_loss(d, t, a)
    rows = a.sum(-1) > 1
    q = torch.softmax(d.masked_fill(~a, float("-inf")), -1)[rows]
    p = torch.softmax(t.masked_fill(~a, float("-inf")), -1)[rows]
    assert got.item() == pytest.approx(0.5 * (q - p).abs().sum(-1).mean().item(), abs=1e-12)
    assert relaxed_alignment_loss(d, d.clone(), a).item() == pytest.approx(0.0, abs=1e-12)
    # logits of disallowed tokens do not matter
    assert relaxed_alignment_loss(d + 50 * ~a, t - 50 * ~a, a).item() == pytest.approx(got.item(), abs=1e-9)
    # disjoint supports: the maximum, 1
    far = torch.tensor([[30.0, 0.0], [0.0, 30.0]], dtype=torch.float64)
    assert relaxed_alignment_loss(far, far.flip(-1)).item() == pytest.approx(1.0, abs=1e-9)


def test_reverse_kl_is_kl_on_the_drafts_top_k():
    d, t, a = _logits(seed=2), _logits(seed=3), _allowed()
    k = 3
    got = reverse_kl_topk(d, t, a, k)
    for r in range(d.shape[0]):
        allowed = a[r].nonzero().squeeze(1)
        order = allowed[d[r, allowed].argsort(descending=True)][:k]
        q = torch.softmax(d[r, order], 0)
        p = torch.softmax(t[r, order], 0)
        assert got[r].item() == pytest.approx((q * (q.log() - p.log())).sum().item(), abs=1e-9)
    assert torch.allclose(reverse_kl_topk(d, d.clone(), a, k), torch.zeros(d.shape[0], dtype=torch.float64))
    # the target outside the draft's top-K does not count
    top = d.masked_fill(~a, float("-inf")).topk(k, -1).indices
    outside = torch.ones_like(a).scatter(-1, top, False)
    assert torch.allclose(reverse_kl_topk(d, t + 7 * outside, a, k), got, atol=1e-9)


def test_density_regulariser_rewards_a_peaked_draft():
    t, a = _logits(seed=4), _allowed()
    d = _logits(seed=5)
    reg = density_regulariser(d, t, a, 3)
    assert (reg >= 0).all()
    assert (density_regulariser(4 * d, t, a, 3) <= reg + 1e-12).all()  # sharper draft, lower entropy on its top-K
    # by hand for one row: -p(s_K) * sum_S q log q with the unnormalised constrained q
    r = 0
    log_q = torch.log_softmax(d[r].masked_fill(~a[r], float("-inf")), 0)
    top = log_q.topk(3).indices
    p = torch.softmax(t[r].masked_fill(~a[r], float("-inf")), 0)
    assert reg[r].item() == pytest.approx((-p[top[-1]] * (log_q[top].exp() * log_q[top]).sum()).item(), abs=1e-9)


def test_losses_train_a_free_draft_towards_the_target():
    t, a = _logits(seed=6), _allowed()
    for mode in ("relaxed", "strict"):
        d = _logits(seed=7).clone().requires_grad_(True)
        opt = torch.optim.Adam([d], lr=0.1)
        first = alignment_loss(mode, d, t, a, 3).item()
        for _ in range(300):
            opt.zero_grad()
            alignment_loss(mode, d, t, a, 3).backward()
            opt.step()
        assert alignment_loss(mode, d, t, a, 3).item() < 0.5 * first
        if mode == "relaxed":
            assert relaxed_alignment_loss(d, t, a).item() < 0.02
        else:  # on its own top-K the draft ranks like the target
            assert reverse_kl_topk(d, t, a, 3).max().item() < 0.02
    # rows with fewer allowed tokens than K (the last one is forced): finite gradients
    d = _logits(seed=8).requires_grad_(True)
    for mode in ("relaxed", "strict"):
        d.grad = None
        alignment_loss(mode, d, t, a, 8).backward()
        assert torch.isfinite(d.grad).all() and d.grad[~a].abs().max() == 0
    forced = torch.zeros(2, 9, dtype=torch.bool)
    forced[:, 4] = True
    assert strict_alignment_loss(t[:2], t[2:4], forced).item() == 0.0
    with pytest.raises(PadrecError):
        alignment_loss("loose", t, t)


@functools.lru_cache(maxsize=4)
def tiny_model(vocab_size: int, seed: int):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().to(torch.float64)


def test_beam_teacher_rows_line_up_with_draft_loss():
    """The teacher beams are the target's beam search; every loss row's mask allows the beam token fed next; a
    draft equal to the target has zero alignment loss."""
    vocab = SIDVocab((3, 3, 2), "per_level")
    items = [vocab.item_tokens((a, b, c)) for a in range(3) for b in range(3) for c in range(2) if a != b or c]
    trie = ItemTrie(items)
    target = tiny_model(vocab.size, 0)
    windows = [[0, 5, 9], [3, 1], [7, 2, 11, 4], [6]]
    examples = []
    for w in windows:
        ids = [BOS] + [t for i in w for t in (*items[i], SEP)]
        examples.append((ids, ids))
    cfg = DraftTrainConfig(kind="lm")
    for mode in ("relaxed", "strict"):
        aligner = BeamAligner(target, trie, examples, mode, topk=4, per_batch=3, seed=1)
        batch, allowed = aligner.batch([0, 1, 2, 3])
        assert allowed.shape[0] == 3 * 4 * 3 == int((batch["labels"] != -100).sum())
        labels = batch["labels"][batch["labels"] != -100]
        assert allowed[torch.arange(len(labels)), labels].all()
        for i, beams in aligner.beams.items():
            plain = beam_search_items(target, aligner.prompt(i), trie, 4, 4)
            assert beams == [trie.item_tokens[j] for j in plain.items]
        loss = aligner.loss("lm", target, target.get_output_embeddings(), [0, 1, 2, 3], cfg)
        if mode == "relaxed":
            assert loss.item() == pytest.approx(0.0, abs=1e-6)
        else:  # reverse KL vanishes; the density term is what is left
            H = target.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            _, d_logits, t_logits = draft_loss("lm", target, target.get_output_embeddings(), batch,
                                               H.last_hidden_state, cfg)
            assert reverse_kl_topk(d_logits[0], t_logits, allowed, 4).abs().max().item() < 1e-6
    with pytest.raises(PadrecError):
        BeamAligner(target, trie, examples, "loose", 4, 3)


def test_train_draft_with_alignment_through_the_cli(synth_env, trained_run, tmp_path):
    from padrec.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for kind, mode in (("lm", "strict"), ("eagle", "relaxed")):
        name = f"{kind}-{mode}"
        rc = main(["train-draft", "--run", str(run), "--kind", kind, "--name", name, "--epochs", "1",
                   "--align", mode, "--align-top-k", "4", "--threads", "1"])
        assert rc == 0
        meta = json.loads((run / "drafts" / name / "draft.json").read_text())
        assert meta["config"]["align"] == mode and meta["config"]["align_topk"] == 4
        h = meta["history"][0]
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["valid_loss"]) and h["train_loss"] > 0
