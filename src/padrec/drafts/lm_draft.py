"""Independent small LM draft: a 1-2 layer LLaMA over the same SID vocabulary, distilled from the target.

Loss on SID-token positions: T^2 * KL(softmax(target/T) || softmax(draft/T)) + w_hard * CE(draft, data token).
At inference it is wrapped by the generic HF-causal-LM adapter `padrec.drafts.lm_draft_session.ModelDraft`
(KV cache + tree-mask propose + rollback); the draft itself uses no target features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from padrec import PadrecError
from padrec.drafts.lm_draft_session import ModelDraft
from padrec.tokenizer.vocab import BOS, EOS, PAD


@dataclass(frozen=True)
class LMDraftConfig:
    vocab_size: int
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int | None = None  # default 3 * hidden
    max_positions: int = 2048

    def llama_config(self) -> LlamaConfig:
        if self.hidden % self.heads:
            raise PadrecError(f"LM draft hidden size {self.hidden} is not divisible by its {self.heads} heads")
        cfg = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            intermediate_size=self.intermediate or 3 * self.hidden,
            max_position_embeddings=self.max_positions,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            tie_word_embeddings=False,  # safetensors' save_file refuses shared tensors
        )
        cfg._attn_implementation = "sdpa"
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def build_lm_draft(cfg: LMDraftConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg.llama_config())
    return model


def distill_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float = 1.0,
    hard_labels: torch.Tensor | None = None,
    w_hard: float = 0.0,
) -> torch.Tensor:
    """Mean over positions ([N, V] inputs, already restricted to the SID-token positions)."""
    t = temperature
    log_q = F.log_softmax(draft_logits.float() / t, dim=-1)
    log_p = F.log_softmax(target_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * (t * t)
    if w_hard and hard_labels is not None:
        kl = kl + w_hard * F.cross_entropy(draft_logits.float(), hard_labels)
    return kl


def make_lm_draft(model, name: str = "lm"):
    """Wrap a trained LM draft as a `Draft` with the shared HF-causal-LM adapter (drafts/lm_draft_session.py)."""
    return ModelDraft(model.eval(), name=name)
