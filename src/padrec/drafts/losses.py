"""The training losses of the two draft families, on the target's last hidden states H over a batch of windows
(SID-token positions only): a feature-level head (EAGLE, HASS, PAD-Rec) regresses the target's features over its
unrolled steps and matches its next-token distribution; an independent LM is distilled from the target's logits.
Each returns the loss and the draft's logits at the SID positions, per unrolled step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from padrec.drafts.hass import unrolled_features
from padrec.drafts.lm_draft import distill_loss
from padrec.training.sequences import IGNORE


def sid_positions(batch) -> torch.Tensor:
    """[B, T-1] bool: position i predicts an SID token (the label of i+1 is not ignored)."""
    return batch["labels"][:, 1:] != IGNORE


def soft_ce(d_logits: torch.Tensor, t_logits: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """Cross-entropy of the draft against the target's distribution; with topk > 0 only over the target's top-k
    tokens (HASS: the tokens a tree can actually draft)."""
    p = t_logits.softmax(-1)
    if topk > 0:
        top = p.topk(min(topk, p.shape[-1]), dim=-1)
        p = torch.zeros_like(p).scatter(-1, top.indices, top.values)
    return -(p * d_logits.log_softmax(-1)).sum(-1).mean()


def feature_loss(model, batch, H: torch.Tensor, t_logits: torch.Tensor, cfg, steps: int):
    """Smooth-L1 to the target's features + w_token x soft CE to its distribution, per unrolled step (weights
    step_decay**j), normalised by the weights."""
    M = sid_positions(batch)
    feats = torch.zeros_like(H)
    feats[:, 1:] = H[:, :-1]  # the state before each token; zero before BOS
    outs = unrolled_features(model, batch["input_ids"], feats, batch["attention_mask"], steps)
    loss, weight, d_logits = 0.0, 0.0, []
    for j, out in enumerate(outs):
        f_hat = out[:, :-1][M]
        logits = model.logits(f_hat).float()
        w = cfg.step_decay ** j
        token = soft_ce(logits, t_logits, cfg.hass_topk)
        loss = loss + w * (F.smooth_l1_loss(f_hat, H[:, :-1][M]) + cfg.w_token * token)
        weight += w
        d_logits.append(logits)
    return loss / weight, d_logits


def lm_loss(model, batch, H: torch.Tensor, t_logits: torch.Tensor, cfg, steps: int):
    """Distillation of an independent LM from the target's logits (+ w_hard x CE on the data tokens)."""
    M = sid_positions(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][M].float()
    hard = batch["labels"][:, 1:][M]
    return distill_loss(logits, t_logits, cfg.temperature, hard, cfg.w_hard), [logits]
