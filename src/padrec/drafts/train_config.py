"""The configuration of one draft training (`padrec train-draft`), and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from padrec import PadrecError
from padrec.drafts.kinds import DRAFT_KINDS, FEATURE_KINDS, KINDS
from padrec.training.loop import LoopConfig


@dataclass
class DraftTrainConfig(LoopConfig):
    kind: str = "eagle"  # "eagle" | "hass" | "padrec" | "lm"
    name: str | None = None  # folder under runs/<run>/drafts/; default: the kind
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    max_valid_cases: int = 2000
    max_train_examples: int | None = None  # a seeded sample of the training windows (studies of many drafts)
    feature_cache_mb: float = 2048.0  # keep the target's hidden states in memory up to this size; 0 = never
    # eagle
    w_token: float = 0.1  # weight of the soft CE against the target's next-token distribution
    eagle_intermediate: int | None = None  # MLP width of the draft layer; default: the target's
    freeze_embed: bool = True
    # hass (and padrec on a hass base)
    hass_steps: int = 3  # unrolled steps J
    hass_topk: int = 0  # > 0: the token loss only covers the target's top-k tokens (HASS top-k distillation)
    step_decay: float = 1.0  # weight of unrolled step j is step_decay**(j-1)
    # padrec: the position module's parts (ablations switch them off)
    padrec_base: str = "hass"  # "eagle" | "hass": how the head is trained
    ipe: bool = True
    spe: bool = True
    gate: bool = True
    learn_alpha: bool = True
    # lm
    lm_layers: int = 2
    lm_hidden: int = 128
    lm_heads: int = 4
    lm_intermediate: int | None = None
    temperature: float = 1.0
    w_hard: float = 0.0  # weight of the hard CE on the data tokens
    # top-K alignment along the target's beams (AtSpeed, drafts/alignment.py), added to any kind's loss
    align: str | None = None  # None | "strict" (reverse KL on the draft's top-K + density) | "relaxed" (TVD)
    align_weight: float = 0.5
    align_topk: int = 10  # the target's beam width for the teacher beams, and the top-K support of "strict"
    align_examples: int = 8  # examples per batch that get the term (each costs align_topk teacher-forced beams)
    # warm start: begin from the weights of another feature draft of the same run (a PAD-Rec draft from its
    # trained base: the module starts as the identity, so training adds the module to a converged head)
    init_from: str | None = None
    # > 0: also score every epoch along the target's greedy lists of this many validation users
    # (drafts/target_lists.py) and pick the best epoch by that score, which ranks drafts as inference does
    list_valid_users: int = 0
    # > 0: add the target's greedy lists for this many training users (prompted with a prefix of their training
    # items) to the training windows: the text the draft drafts at inference
    list_train_users: int = 0

    @property
    def draft_name(self) -> str:
        return self.name or self.kind

    @property
    def steps(self) -> int:
        """Unrolled training steps (1 = plain EAGLE / LM training)."""
        return DRAFT_KINDS[self.kind].unrolled(self) if self.kind in DRAFT_KINDS else 1

    def check(self) -> None:
        if self.kind not in KINDS:
            raise PadrecError(f"unknown draft kind {self.kind!r}: expected one of {KINDS}")
        if self.padrec_base not in ("eagle", "hass"):
            raise PadrecError(f"unknown PAD-Rec base {self.padrec_base!r}: expected eagle or hass")
        if self.hass_steps < 1:
            raise PadrecError(f"hass_steps must be >= 1, got {self.hass_steps}")
        if self.init_from is not None and self.kind not in FEATURE_KINDS:
            raise PadrecError(f"init_from warm-starts feature drafts ({', '.join(FEATURE_KINDS)}), not {self.kind!r}")
        if self.init_from is not None and self.init_from == self.draft_name:
            raise PadrecError(f"draft {self.draft_name!r} cannot start from itself: give the new draft another name")
