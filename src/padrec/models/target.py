"""The target recommender: a decoder-only LLaMA from Hugging Face `transformers` over the SID vocabulary."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from padrec import PadrecError
from padrec.tokenizer.vocab import BOS, EOS, PAD


@dataclass(frozen=True)
class TargetPreset:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_positions: int = 512


# tiny: tests.  small: the CPU demo (trains in minutes).  medium/large: deeper targets for a GPU
# (and for CPU speculative-decoding studies, where a deep target makes drafting pay off).
PRESETS: dict[str, TargetPreset] = {
    "tiny": TargetPreset(layers=2, hidden=32, heads=2, intermediate=64),
    "small": TargetPreset(layers=4, hidden=256, heads=4, intermediate=768),
    # deep and narrow: latency-bound at batch 1 like a large model on a GPU (verifying many tokens costs about
    # as much as one step), the CPU setting where speculative decoding pays off.
    "deep": TargetPreset(layers=12, hidden=256, heads=4, intermediate=768),
    # twice as deep: a draft step is then ~3% of a target step (9% for `deep`), the depth at which a chain of
    # drafts clears 2x on a 2-core CPU.
    "deeper": TargetPreset(layers=24, hidden=256, heads=4, intermediate=768),
    # as deep at half the width: a step costs about what `deeper`'s does at batch 1 (latency-bound), a quarter of
    # the weights (the zoo's shape: 5M parameters, 10 MB in 16 bits) and about a third of the training time.
    "narrow": TargetPreset(layers=24, hidden=128, heads=4, intermediate=384),
    "medium": TargetPreset(layers=8, hidden=512, heads=8, intermediate=1536),
    "large": TargetPreset(layers=12, hidden=768, heads=12, intermediate=2304),
}


def get_preset(name: str) -> TargetPreset:
    if name not in PRESETS:
        raise PadrecError(f"unknown target preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_target(vocab_size: int, preset: str | TargetPreset = "small", seed: int = 0) -> LlamaForCausalLM:
    p = get_preset(preset) if isinstance(preset, str) else preset
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        intermediate_size=p.intermediate,
        max_position_embeddings=p.max_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def preset_dict(preset: str | TargetPreset) -> dict:
    p = get_preset(preset) if isinstance(preset, str) else preset
    return asdict(p)


def adapt_base_model(path: str, vocab_size: int, seed: int = 0):
    """Load a local HF causal-LM checkpoint (LLaMA, Qwen2, ...) and give it the SID vocabulary.

    The recommender only ever reads and writes SID/special tokens, so the pretrained body is kept and the
    token embeddings and LM head are replaced by `vocab_size` new rows, initialised around the mean of the
    pretrained embeddings (the usual recipe for added tokens). Decoders then see one dense vocabulary
    whatever the base model was.
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise PadrecError(f"cannot load a causal LM from {path}: {e}") from e
    old = model.get_input_embeddings().weight.detach()
    mean, std = old.mean(0), old.std(0).mean()
    torch.manual_seed(seed)
    model.resize_token_embeddings(vocab_size)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(mean + 0.02 * std * torch.randn_like(emb))
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight.normal_(0.0, 0.02)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = PAD, BOS, EOS
    return model
