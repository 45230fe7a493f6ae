"""PAD-Rec: position-aware drafting. An EAGLE/HASS draft whose fused input also learns where it is.

    h = fc([embed(x_t); f_{t-1}])                          the base draft's fused input
    h ← h + α · E_slot[slot(t)]                           item position embedding (IPE), α learnable
    g = σ(W_g h + b_g)                                    context-driven gate, from the fused input
    h ← h + g ⊙ E_step[depth(t)]                          step position embedding (SPE)

slot(t): the within-item slot of the input token (SID level 0..L-1, separator, other; `drafts/slots.py`).
depth(t): 0 when the paired feature came from the target, k when the draft produced it at its k-th step (the
unrolled step in multi-step training, the tree depth at inference). Depths beyond the deepest one seen in
training reuse the deepest embedding: an embedding that was never trained would only add noise.

Every part can be switched off for ablation (`PositionConfig`); with IPE and SPE both off the module is the
identity and the draft is numerically its base draft.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from padrec.drafts.eagle_model import EagleConfig, EagleDraftModel
from padrec.models.fused_layer import stamp_of


@dataclass(frozen=True)
class PositionConfig:
    levels: int  # SID levels L of the run's items
    ipe: bool = True  # item position embedding
    spe: bool = True  # step position embedding
    gate: bool = True  # admit the SPE through σ(W_g h + b_g); False = plain addition
    learn_alpha: bool = True  # False = α fixed at 1
    trained_depths: int = 1  # depths 0..trained_depths-1 were seen in training (the unrolled steps)
    sid_end: int | None = None  # SID token ids end here (an imported model's text follows; slots.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["sid_end"] is None:  # a padrec-trained vocabulary: recorded as before sid_end existed
            del d["sid_end"]
        return d

    @property
    def parts(self) -> str:
        on = [name for name, flag in (("ipe", self.ipe), ("spe", self.spe)) if flag]
        if self.spe:
            on.append("gate" if self.gate else "add")
        if self.ipe:
            on.append("alpha" if self.learn_alpha else "alpha=1")
        return "+".join(on) or "none"


class PositionModule(nn.Module):
    def __init__(self, cfg: PositionConfig, hidden: int, std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        if cfg.ipe:
            self.slot_embed = nn.Embedding(cfg.levels + 2, hidden)
            nn.init.normal_(self.slot_embed.weight, 0.0, std)
            # a buffer when fixed, so a checkpoint always holds α and loading checks its presence
            alpha = torch.ones(())
            if cfg.learn_alpha:
                self.alpha = nn.Parameter(alpha)
            else:
                self.register_buffer("alpha", alpha)
        if cfg.spe:
            self.step_embed = nn.Embedding(max(1, cfg.trained_depths), hidden)
            nn.init.normal_(self.step_embed.weight, 0.0, std)
            if cfg.gate:
                self.gate = nn.Linear(hidden, hidden)
                nn.init.normal_(self.gate.weight, 0.0, std)
                nn.init.zeros_(self.gate.bias)

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """Zero both embedding tables: the module then maps h to h exactly (gate or not), so a draft warm-started
        from its trained base begins as that base and training alone decides what the module adds."""
        for name in ("slot_embed", "step_embed"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)

    @torch.no_grad()
    def inference_fn(self):
        """The same map for a decoding session, from tables frozen when the session starts: α·E_slot and E_step
        rows are picked by plain indexing, the gate is one linear. Module calls and per-call clamps cost more than
        the arithmetic on a CPU at batch 1, and the draft runs this at every step."""
        cfg = self.cfg
        slot_rows = (self.alpha * self.slot_embed.weight).detach().clone() if cfg.ipe else None
        step_rows = self.step_embed.weight.detach().clone() if cfg.spe else None
        gate = (self.gate.weight.detach().clone(), self.gate.bias.detach().clone()) if cfg.spe and cfg.gate else None
        deepest = step_rows.shape[0] - 1 if step_rows is not None else 0

        def apply(h: torch.Tensor, slots: list[int] | None, depths: list[int]) -> torch.Tensor:
            """h [n, d] for n nodes with these slots and depths."""
            if slot_rows is not None:
                h = h + (slot_rows[slots[0]] if len(slots) == 1 else slot_rows[slots])
            if step_rows is not None:
                d = [min(x, deepest) for x in depths]
                step = step_rows[d[0]] if len(d) == 1 else step_rows[d]
                h = torch.addcmul(h, torch.sigmoid(F.linear(h, *gate)), step) if gate is not None else h + step
            return h

        return apply

    @torch.no_grad()
    def folded_inference_fn(self, token_proj: torch.Tensor, feat_w: torch.Tensor):
        """The base draft's fusion and this module as one map, for a decoding session on the fused path; None when
        there is no gate to fold (then `inference_fn` after the fusion is already as cheap).

        The fused input is h0 = token_proj[x] + feat_w f, and the gate reads W_g (h0 + α E_slot[s]) + b_g. Both are
        linear in (x, f, s), so one product of f with [feat_w; W_g feat_w] gives the feature's part of h and of the
        gate together, and per-token rows [token_proj; W_g token_proj + b_g] and per-slot rows [α E_slot;
        W_g α E_slot] add the rest: the gate costs no product of its own at inference (the same function, summed
        in another order: float rounding apart)."""
        cfg = self.cfg
        if not (cfg.spe and cfg.gate):
            return None
        wg, bg = self.gate.weight.detach(), self.gate.bias.detach()
        d = token_proj.shape[1]
        both_w = torch.cat([feat_w, wg @ feat_w], 0).contiguous()  # [2d, d]
        token_rows = torch.cat([token_proj, F.linear(token_proj, wg, bg)], 1).contiguous()  # [V, 2d]
        slot_rows = None
        if cfg.ipe:
            a = (self.alpha * self.slot_embed.weight).detach()
            slot_rows = torch.cat([a, F.linear(a, wg)], 1).contiguous()  # [slots, 2d]
        step_rows = self.step_embed.weight.detach().clone()
        deepest = step_rows.shape[0] - 1

        def apply(tok: torch.Tensor, feats: torch.Tensor, slots: list[int] | None, depths: list[int],
                  zero_first_feature: bool = False) -> torch.Tensor:
            """tok: the rows of `token_rows` of the n inputs [n, 2d]; feats [n, d] -> the module's output h [n, d]."""
            y = F.linear(feats, both_w)
            if zero_first_feature:
                y[0] = 0.0
            y.add_(tok)
            if slot_rows is not None:
                y.add_(slot_rows[slots[0]] if len(slots) == 1 else slot_rows[slots])
            step = step_rows[min(depths[0], deepest)] if len(depths) == 1 else step_rows[
                [min(x, deepest) for x in depths]]
            return torch.addcmul(y[:, :d], torch.sigmoid(y[:, d:]), step)

        return token_rows, apply

    def forward(self, h: torch.Tensor, slots: torch.Tensor | None, depths: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.ipe:
            if slots is None:
                raise ValueError("PAD-Rec with an item position embedding needs the slot of every input token")
            h = h + self.alpha * self.slot_embed(slots)
        if self.cfg.spe:
            if depths is None:
                raise ValueError("PAD-Rec with a step position embedding needs the draft depth of every input")
            step = self.step_embed(depths.clamp(0, self.step_embed.num_embeddings - 1))
            h = h + (torch.sigmoid(self.gate(h)) * step if self.cfg.gate else step)
        return h


class PadRecDraftModel(EagleDraftModel):
    """The EAGLE draft head with the position module between fusion and the decoder layer."""

    needs_slots = True

    def __init__(self, cfg: EagleConfig, position: PositionConfig):
        super().__init__(cfg)
        self.position = PositionModule(position, cfg.hidden_size)

    @property
    def levels(self) -> int:
        return self.position.cfg.levels

    @property
    def sid_end(self) -> int | None:
        return self.position.cfg.sid_end

    @classmethod
    def from_target(cls, target, position: PositionConfig, intermediate_size: int | None = None,
                    freeze_embed: bool = True, seed: int = 0) -> "PadRecDraftModel":
        base = EagleDraftModel.from_target(target, intermediate_size, freeze_embed, seed=seed)
        torch.manual_seed(seed + 1)
        model = cls(base.cfg, position)
        # the base part starts exactly as an EAGLE draft with the same seed would, so PAD-Rec vs its base
        # compares the module and nothing else
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("position.") for k in missing), (missing, unexpected)
        return model

    def extra(self, h, slots=None, depths=None, position_ids=None):
        return self.position(h, slots, depths)

    def session_extra(self):
        """`extra` for a decoding session on the fused path: (h [n, d], slots, depths as int lists) -> h."""
        return self.position.inference_fn()

    def session_fuse(self, w):
        """Fusion + `extra` in one map for a session on the fused path (see `PositionModule.folded_inference_fn`):
        (token rows table, fn(token rows, feats, slots, depths, zero_first_feature) -> h), or None. `w`: the base
        draft's `FastDraftWeights`. Built once per weight snapshot (a product over the whole vocabulary costs about
        a millisecond, as much as a decode's worth of module overhead), rebuilt when any weight changed."""
        key = (w.stamp, stamp_of(list(self.position.parameters()) + list(self.position.buffers())))
        hit = self.__dict__.get("_fold_cache")
        if hit is None or hit[0] != key:
            hit = (key, self.position.folded_inference_fn(w.token_proj, w.fc_feat_w))
            self.__dict__["_fold_cache"] = hit
        return hit[1]

    def model_config(self) -> dict:
        return {"eagle": self.cfg.to_dict(), "position": self.position.cfg.to_dict()}
