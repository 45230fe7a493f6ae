"""The fused target path (`padrec.models.fast_target`) == the Hugging Face module path it replaces (Llama, and
Qwen2 with its biased q/k/v).

The property tests of tests/test_decoding.py and tests/test_speculative.py already compare the fast decoders (now on
this path) with `generate_list_reference` (Hugging Face, a call per token) token for token; here: the numbers
themselves, the cache bookkeeping, and the fallback for models the path does not cover.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from padrec.decoding.autoregressive import GenerationConfig, generate_list, generate_list_reference, new_cache
from padrec.decoding.trie import ItemTrie
from padrec import PadrecError
from padrec.models.fast_target import fast_target, supports_fast_target, use_fast_target
from padrec.decoding.kv import additive_mask, decoder_forward, keep_prefix_and
from padrec.speculative.verify import TargetSession
from padrec.tokenizer.vocab import BOS, SEP, SIDVocab


def _llama(seed=0, dtype=torch.float32, kv_heads=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=29, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=48, max_position_embeddings=256,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _qwen(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=29, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                      initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def _hf(model, tokens, cache, start, visible=None, positions=None):
    ids = torch.tensor([tokens])
    pos = torch.tensor([positions if positions is not None else list(range(start, start + len(tokens)))])
    mask = None if visible is None else additive_mask(visible, torch.float32)
    logits, hidden = decoder_forward(model, ids, cache, mask, pos)
    return logits[0], hidden[0]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@torch.inference_mode()
def test_forward_equals_the_module_path(kv_heads):
    model = _llama(kv_heads=kv_heads)
    assert supports_fast_target(model) is None
    ft = fast_target(model)
    bufs, cache = ft.new_cache(), new_cache(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 29, (11,), generator=gen).tolist()
    a_l, a_h = ft.forward(bufs, prompt, 0)
    b_l, b_h = _hf(model, prompt, cache, 0)
    torch.testing.assert_close(a_l, b_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_h, b_h, atol=1e-5, rtol=1e-5)
    n = len(prompt)
    for step in range(3):  # single tokens, then a block of 3 under causal attention
        new = torch.randint(3, 29, (1 if step < 2 else 3,), generator=gen).tolist()
        a_l, a_h = ft.forward(bufs, new, n)
        b_l, b_h = _hf(model, new, cache, n)
        torch.testing.assert_close(a_l, b_l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a_h, b_h, atol=1e-5, rtol=1e-5)
        n += len(new)
    # a tree block: explicit visibility and depth-based positions, only some head rows
    visible = torch.zeros(4, n + 4, dtype=torch.bool)
    visible[:, :n] = True
    for i, anc in enumerate([[0], [0, 1], [2], [2, 3]]):
        visible[i, [n + a for a in anc]] = True
    pos = [n, n + 1, n, n + 1]
    toks = [5, 6, 7, 8]
    a_l, a_h = ft.forward(bufs, toks, n, pos, visible, head_rows=slice(1, None))
    b_l, b_h = _hf(model, toks, cache, n, visible, pos)
    torch.testing.assert_close(a_l, b_l[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_h, b_h, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_keep_on_buffers_equals_the_dynamic_cache_version():
    model = _llama(1)
    ft = fast_target(model)
    bufs, cache = ft.new_cache(), new_cache(model)
    toks = list(range(3, 15))
    ft.forward(bufs, toks, 0)
    _hf(model, toks, cache, 0)
    for prefix, tail in [(8, [9, 11]), (5, [5, 6, 9]), (7, [])]:
        # each structure must keep exactly its own rows prefix + tail: compared with a snapshot of itself, since
        # the two paths' keys agree only to float32 rounding (the fused q/k/v product sums in another order)
        keep = list(range(prefix)) + tail
        want = [(kv.keys[:, keep].clone(), kv.values[:, keep].clone(), layer.keys[0][:, keep].clone(),
                 layer.values[0][:, keep].clone()) for kv, layer in zip(bufs, cache.layers)]
        keep_prefix_and(bufs, prefix, tail)  # the fused path's buffers
        keep_prefix_and(cache, prefix, tail)  # a DynamicCache
        for kv, layer, (fk, fv, hk, hv) in zip(bufs, cache.layers, want):
            assert kv.length == layer.keys.shape[-2] == prefix + len(tail)
            assert torch.equal(kv.keys[:, : kv.length], fk) and torch.equal(kv.values[:, : kv.length], fv)
            assert torch.equal(layer.keys[0], hk) and torch.equal(layer.values[0], hv)
            torch.testing.assert_close(kv.keys[:, : kv.length], layer.keys[0], atol=1e-5, rtol=1e-5)
        ft.forward(bufs, [4, 5], bufs[0].length)  # refill for the next case
        _hf(model, [4, 5], cache, cache.get_seq_length())
    with pytest.raises(PadrecError, match="beyond the cache length"):
        keep_prefix_and(bufs, 2, [40])


def test_weight_changes_rebuild_the_snapshot():
    model = _llama(2)
    before = fast_target(model)
    assert fast_target(model) is before
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    after = fast_target(model)
    assert after is not before
    assert torch.equal(after.layers[1].down_w, model.model.layers[1].mlp.down_proj.weight)


def _catalogue():
    vocab = SIDVocab((3, 3), "per_level")
    items = [vocab.item_tokens((a, b)) for a in range(3) for b in range(3)][:8]
    return vocab, items


@pytest.mark.parametrize("seed", range(3))
def test_greedy_lists_equal_on_both_paths(seed):
    vocab, items = _catalogue()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval().to(torch.float64)
    trie = ItemTrie(items)
    gcfg = GenerationConfig(n_items=5)
    prompt = [BOS, *items[seed], SEP, *items[seed + 2], SEP]
    ref = generate_list_reference(model, prompt, trie, gcfg)
    assert generate_list(model, prompt, trie, gcfg, fast=True).tokens == ref.tokens
    assert generate_list(model, prompt, trie, gcfg, fast=False).tokens == ref.tokens


@torch.inference_mode()
def test_qwen2_biased_qkv_equals_the_module_path():
    model = _qwen()
    assert supports_fast_target(model) is None
    ft = fast_target(model)
    assert ft.layers[0].qkv_b is not None
    bufs, cache = ft.new_cache(), new_cache(model)
    prompt = list(range(3, 14))
    for new, start in [(prompt, 0), ([5], 11), ([6, 7, 8], 12)]:
        a_l, a_h = ft.forward(bufs, new, start)
        b_l, b_h = _hf(model, new, cache, start)
        torch.testing.assert_close(a_l, b_l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a_h, b_h, atol=1e-5, rtol=1e-5)


def test_models_the_path_does_not_cover_run_through_hugging_face():
    torch.manual_seed(0)
    vocab, items = _catalogue()
    cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, initializer_range=0.2, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    why = supports_fast_target(model)
    assert why and "biased output/MLP" in why
    assert not use_fast_target(model)
    with pytest.raises(ValueError, match="no fused inference path"):
        use_fast_target(model, True)
    assert not TargetSession(model).fast
    trie = ItemTrie(items)
    prompt = [BOS, *items[1], SEP]
    gcfg = GenerationConfig(n_items=4)
    assert generate_list(model, prompt, trie, gcfg).tokens == generate_list_reference(model, prompt, trie, gcfg).tokens


def test_llama_variants_outside_the_path_are_refused():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=29, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=48, attention_bias=True)  # o_proj biased too
    assert "biased output" in supports_fast_target(LlamaForCausalLM(cfg))
    cfg = LlamaConfig(vocab_size=29, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=48, hidden_act="gelu")
    assert "activation" in supports_fast_target(LlamaForCausalLM(cfg))
