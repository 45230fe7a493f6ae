"""What a draft is trained and validated on: the target's hidden states over the training windows
(`TargetFeatures`), the loss of each draft kind against them (`draft_loss`), and top-1 agreement with the target by
unrolled step and SID level (`validate`).
"""

from __future__ import annotations

import torch

from padrec import PadrecError
from padrec.drafts.kinds import DRAFT_KINDS
from padrec.drafts.losses import sid_positions
from padrec.drafts.train_config import DraftTrainConfig
from padrec.training import distributed as dist
from padrec.training.sequences import collate

VALID_STEPS = 3


class TargetFeatures:
    """The target's last hidden states for a fixed list of examples, computed on demand and optionally cached."""

    def __init__(self, target, examples, cache_mb: float):
        self.target = target
        self.d = target.config.get_text_config().hidden_size
        n_tokens = sum(len(ids) for ids, _ in examples)
        self.enabled = n_tokens * self.d * 2 <= cache_mb * 2**20
        self.store: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, idx: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B, T = batch["input_ids"].shape
        if self.enabled and all(i in self.store for i in idx):
            H = torch.zeros(B, T, self.d)
            for b, i in enumerate(idx):
                h = self.store[i]
                H[b, : h.shape[0]] = h.float()
            return H
        H = self.target.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        H = H.last_hidden_state.float()
        if self.enabled:
            H = H.half()
            lengths = batch["attention_mask"].sum(1).tolist()
            for b, i in enumerate(idx):
                self.store[i] = H[b, : lengths[b]].clone()
            H = H.float() * batch["attention_mask"][..., None]  # same values as later epochs read back
        return H


def check_head_on_features(target, batch: dict[str, torch.Tensor]) -> None:
    """Soft labels are lm_head(H): make sure that is what the target computes."""
    with torch.no_grad():
        out = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        H = target.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mine = target.get_output_embeddings()(H)
    if not torch.allclose(mine, out.logits, atol=1e-4, rtol=1e-4):
        raise PadrecError(
            "the target's logits are not lm_head(last_hidden_state) (logit scaling/soft-capping?); "
            "feature-level drafts cannot use this target"
        )


def draft_loss(kind: str, model, head, batch, H: torch.Tensor, cfg: DraftTrainConfig, steps: int | None = None):
    """Loss, the draft's logits at the SID positions for each unrolled step (list of [N, V]) and the target's
    ([N, V]). `steps` overrides the configured unroll (validation looks deeper than EAGLE trains)."""
    with torch.no_grad():
        t_logits = head(H[:, :-1][sid_positions(batch)]).float()
    loss, d_logits = DRAFT_KINDS[kind].loss(model, batch, H, t_logits, cfg, steps or cfg.steps)
    return loss, d_logits, t_logits


@torch.no_grad()
def validate(kind, model, head, examples, feats: TargetFeatures, cfg: DraftTrainConfig, levels: int,
             batch_size: int = 128, steps: int | None = None) -> dict:
    """Loss and top-1 agreement with the target over the labelled positions of `examples`, per unrolled step
    (`steps`, default max(trained steps, VALID_STEPS); 1 for an LM draft) and per SID level at step 1."""
    model.eval()
    steps = (steps or max(cfg.steps, VALID_STEPS)) if DRAFT_KINDS[kind].features else 1
    loss_sum, n = 0.0, 0
    agree = torch.zeros(steps, dtype=torch.long)
    per_level = torch.zeros(levels, dtype=torch.long)
    per_level_n = torch.zeros(levels, dtype=torch.long)
    for s in range(0, len(examples), batch_size):
        idx = list(range(s, min(len(examples), s + batch_size)))
        batch = collate([examples[i] for i in idx])
        loss, d_logits, t_logits = draft_loss(kind, model, head, batch, feats(idx, batch), cfg, steps)
        k = t_logits.shape[0]
        if k == 0:
            continue
        hits = [d.argmax(-1) == t_logits.argmax(-1) for d in d_logits]
        M = sid_positions(batch)
        level = (M.long().cumsum(1) - 1)[M] % levels  # labels come as whole items: L SID tokens each
        per_level += torch.bincount(level[hits[0]], minlength=levels)
        per_level_n += torch.bincount(level, minlength=levels)
        loss_sum += loss.item() * k
        n += k
        agree += torch.tensor([int(h.sum()) for h in hits])
    model.train()
    if dist.is_distributed():  # each rank validated its own share of the examples
        flat = dist.all_reduce_sum([loss_sum, n, *agree.tolist(), *per_level.tolist(), *per_level_n.tolist()])
        loss_sum, n = flat[0], int(flat[1])
        agree = torch.tensor(flat[2 : 2 + steps])
        per_level = torch.tensor(flat[2 + steps : 2 + steps + levels])
        per_level_n = torch.tensor(flat[2 + steps + levels :])
    by_step = (agree.float() / max(1, n)).tolist()
    return {
        "valid_loss": loss_sum / max(1, n),
        "valid_agreement": by_step[0],
        "valid_agreement_by_step": by_step,
        "valid_score": sum(by_step) / len(by_step),
        "valid_agreement_per_level": (per_level.float() / per_level_n.clamp(min=1)).tolist(),
    }
