"""The EAGLE-style draft model: one decoder layer over (token embedding, target feature) pairs (its sessions and the
`Draft` wrapper are in drafts/eagle.py, its fused inference weights in drafts/fast_layer.py).

    h      = fuse(x_i, f_{i-1}) = fc([embed(x_i); f_{i-1}])      f_{i-1}: target last hidden state before x_i
    h      = extra(h, slots, depths, position_ids)               identity here; PAD-Rec adds slot/step embeddings
    f̂_i    = LlamaDecoderLayer(h)                               the predicted target feature at x_i
    logits = target_lm_head(f̂_i)                                next-token distribution (frozen copy of the head)

The target features are HF `model.model(...).last_hidden_state`, i.e. *after* the final norm, so the target's
LM head is applied to them (and to f̂) directly.

Positions: a token's position id is its index in the sequence (BOS = 0), in training and in a session alike;
a speculative node at tree depth d sits at `committed_len - 1 + d`. The feature paired with the very first
token (BOS) is the zero vector — in training (there is no state before BOS) and in a session (the first
committed feature is zeroed).

`forward` takes an explicit additive 4D mask and position ids, so multi-step (HASS) training can lay out
several unrolled steps in one sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


@dataclass(frozen=True)
class EagleConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    freeze_embed: bool = True

    @classmethod
    def from_target(cls, target, intermediate_size: int | None = None, freeze_embed: bool = True) -> "EagleConfig":
        """Shape the draft layer like one layer of the target (same hidden size, heads, RoPE)."""
        tc = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        heads = tc.num_attention_heads
        rope = getattr(tc, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
        return cls(
            vocab_size=target.get_output_embeddings().weight.shape[0],
            hidden_size=tc.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            intermediate_size=intermediate_size or tc.intermediate_size,
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_positions=max(2048, int(getattr(tc, "max_position_embeddings", 2048) or 2048)),
            freeze_embed=freeze_embed,
        )

    def llama_config(self) -> LlamaConfig:
        cfg = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_bias=False,
        )
        cfg._attn_implementation = "sdpa"  # works with explicit additive 4D masks
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def causal_mask(pad_mask: torch.Tensor | None, q_len: int, past_len: int = 0, batch: int = 1,
                dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Additive [B, 1, q_len, past_len + q_len] mask: new positions see all the past and causally each other;
    `pad_mask` [B, past_len + q_len] (1 = real) hides padded keys."""
    neg = torch.finfo(dtype).min
    k_len = past_len + q_len
    device = pad_mask.device if pad_mask is not None else device
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=past_len)
    allowed = allowed[None, None].expand(batch if pad_mask is None else pad_mask.shape[0], 1, q_len, k_len)
    if pad_mask is not None:
        allowed = allowed & pad_mask[:, None, None, :].bool()
    out = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return out.masked_fill(~allowed, neg)


class EagleDraftModel(nn.Module):
    """The trainable EAGLE draft head. Token logits use a frozen copy of the target's LM head."""

    needs_slots = False  # PAD-Rec sets this: sessions then track each token's within-item slot

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.cfg = cfg
        lc = cfg.llama_config()
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.layer = LlamaDecoderLayer(lc, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(lc)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.embed.weight.requires_grad_(not cfg.freeze_embed)
        std = 0.02
        for m in (self.fc, self.layer):
            for name, p in m.named_parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

    @classmethod
    def from_target(cls, target, intermediate_size: int | None = None, freeze_embed: bool = True,
                    seed: int = 0) -> "EagleDraftModel":
        torch.manual_seed(seed)
        model = cls(EagleConfig.from_target(target, intermediate_size, freeze_embed))
        with torch.no_grad():
            model.embed.weight.copy_(target.get_input_embeddings().weight)
            model.lm_head.weight.copy_(target.get_output_embeddings().weight)
            bias = getattr(target.get_output_embeddings(), "bias", None)
            if bias is not None:
                raise ValueError("EAGLE draft expects an LM head without bias")
        return model

    # --- the pieces, so subclasses (PAD-Rec, HASS) can recombine them -------------------------------------
    def fuse(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens + [B, T, d] features (the state before each token) -> fused input [B, T, d]."""
        emb = self.embed(input_ids)
        return self.fc(torch.cat([emb, features.to(emb.dtype)], dim=-1))

    def extra(self, h: torch.Tensor, slots: torch.Tensor | None = None, depths: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hook between fusion and the decoder layer (PAD-Rec adds slot / draft-step embeddings here)."""
        return h

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(features)

    def model_config(self) -> dict:
        """What draft.json records to rebuild this architecture."""
        return self.cfg.to_dict()

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        slots: torch.Tensor | None = None,
        depths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted features [B, T, d].

        attention_mask: None (causal), a 2D padding mask [B, past + T] (1 = real; causal is added), or an
        explicit additive 4D mask [B, 1, T, past + T] used as is. position_ids default to past + arange(T).
        """
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device) + past)[None].expand(B, T)
        h = self.fuse(input_ids, features)
        h = self.extra(h, slots=slots, depths=depths, position_ids=position_ids)
        if attention_mask is None or attention_mask.dim() == 2:
            attention_mask = causal_mask(attention_mask, T, past, B, h.dtype, h.device)
        pos_emb = self.rotary(h, position_ids)
        return self.layer(h, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=cache is not None, position_embeddings=pos_emb)
