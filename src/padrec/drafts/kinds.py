"""The draft kinds, in one table: how each is built for training, rebuilt from its draft.json, wrapped for
inference, trained (its loss and unrolled steps). Adding a kind is one entry here.

    eagle   one decoder layer over (token embedding, target feature), trained one step ahead (EAGLE)
    hass    the same head trained over J unrolled steps on its own features (HASS, drafts/hass.py)
    padrec  the head + PAD-Rec's item-slot and draft-step embeddings (drafts/padrec.py), trained like its base
            (`padrec_base`: eagle or hass)
    lm      an independent small LM over the same vocabulary, distilled from the target
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from padrec.drafts.base import Draft
from padrec.drafts.eagle import EagleDraft
from padrec.drafts.eagle_model import EagleConfig, EagleDraftModel
from padrec.drafts.losses import feature_loss, lm_loss
from padrec.drafts.lm_draft import LMDraftConfig, build_lm_draft, make_lm_draft
from padrec.drafts.padrec import PadRecDraftModel, PositionConfig


@dataclass(frozen=True)
class DraftKind:
    name: str
    features: bool  # an EAGLE-style head on the target's features (warm starts, unrolled validation)
    new: Callable  # (target, vocab_size, cfg, sid_vocab) -> (module, model_config for draft.json)
    rebuild: Callable  # model_config -> an untrained module of that architecture
    wrap: Callable[..., Draft]  # (module, name) -> the inference `Draft`
    loss: Callable  # (model, batch, H, target logits, cfg, steps) -> (loss, draft logits per step)
    unrolled: Callable[[object], int] = lambda cfg: 1  # training steps, from the training config


def _new_eagle(target, vocab_size, cfg, sid_vocab):
    model = EagleDraftModel.from_target(target, cfg.eagle_intermediate, cfg.freeze_embed, seed=cfg.seed)
    return model, model.model_config()


def _new_padrec(target, vocab_size, cfg, sid_vocab):
    # an imported model's vocabulary goes on past its SID tokens (its text): they end at sid_vocab.size
    sid_end = sid_vocab.size if vocab_size > sid_vocab.size else None
    position = PositionConfig(levels=sid_vocab.levels, ipe=cfg.ipe, spe=cfg.spe, gate=cfg.gate,
                              learn_alpha=cfg.learn_alpha, trained_depths=cfg.steps, sid_end=sid_end)
    model = PadRecDraftModel.from_target(target, position, cfg.eagle_intermediate, cfg.freeze_embed, seed=cfg.seed)
    return model, model.model_config()


def _new_lm(target, vocab_size, cfg, sid_vocab):
    mc = LMDraftConfig(vocab_size, cfg.lm_layers, cfg.lm_hidden, cfg.lm_heads, cfg.lm_intermediate)
    return build_lm_draft(mc, seed=cfg.seed), mc.to_dict()


def _wrap_eagle(model, name: str) -> Draft:
    return EagleDraft(model, name=name)


_EAGLE = dict(features=True, new=_new_eagle, rebuild=lambda mc: EagleDraftModel(EagleConfig(**mc)),
              wrap=_wrap_eagle, loss=feature_loss)
DRAFT_KINDS: dict[str, DraftKind] = {
    "eagle": DraftKind("eagle", **_EAGLE),
    "hass": DraftKind("hass", **_EAGLE, unrolled=lambda cfg: cfg.hass_steps),
    "padrec": DraftKind(
        "padrec", features=True, new=_new_padrec,
        rebuild=lambda mc: PadRecDraftModel(EagleConfig(**mc["eagle"]), PositionConfig(**mc["position"])),
        wrap=_wrap_eagle, loss=feature_loss,
        unrolled=lambda cfg: cfg.hass_steps if cfg.padrec_base == "hass" else 1),
    "lm": DraftKind("lm", features=False, new=_new_lm, rebuild=lambda mc: build_lm_draft(LMDraftConfig(**mc)),
                    wrap=make_lm_draft, loss=lm_loss),
}
KINDS = tuple(DRAFT_KINDS)
FEATURE_KINDS = tuple(k for k, v in DRAFT_KINDS.items() if v.features)
