"""Training a draft for a run's target: a feature-level head — EAGLE (`kind="eagle"`), the same head trained
with J unrolled steps (`"hass"`, drafts/hass.py), or PAD-Rec (`"padrec"`: the head plus item-slot and draft-step
embeddings, trained like its base, `padrec_base="eagle"|"hass"`) — or an independent small LM distilled from the
target (`kind="lm"`).

Both learn from the target's last hidden states H over the same training windows the target saw (SID-token
positions only). H is computed under no_grad during the first epoch and kept in memory (float16, per example)
when it fits `feature_cache_mb`: on CPU the target forward costs about as much as a whole draft step, so later
epochs run ~2x faster. The target's soft labels are `lm_head(H)` (checked once against the target's logits).

Per epoch: validation on the valid split's next item (teacher forcing) reporting the loss and the top-1
agreement of the draft with the target (the acceptance proxy), per SID level and, for feature-level drafts, per
unrolled step (`VALID_STEPS` at least, whatever the training unroll: step j is how the draft does at tree depth
j-1). With `list_valid_users` the draft is also scored along the target's own greedy lists (`target_lists.py`),
the validation that ranks drafts as inference does. The best epoch (by the agreement averaged over steps: along
the lists when they are scored) goes to `runs/<run>/drafts/<name>/`, every epoch to `drafts/.<name>.last/` for
resuming.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.drafts.registry import (
    FEATURE_KINDS,
    KINDS,
    draft_dir,
    last_dir,
    load_draft_weights,
    read_draft_meta,
    save_draft_dir,
    target_identity,
)
from padrec.training import distributed as dist
from padrec.training.schedule import stop_reason, warmup_cosine_lr
from padrec.training.sequences import (
    IGNORE,
    collate,
    length_bucketed_batches,
    run_examples,
)


VALID_STEPS = 3


@dataclass
class DraftTrainConfig:
    kind: str = "eagle"  # "eagle" | "hass" | "padrec" | "lm"
    name: str | None = None  # folder under runs/<run>/drafts/; default: the kind
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    patience: int = 3  # epochs without validation-agreement improvement before stopping
    max_valid_cases: int = 2000
    max_train_examples: int | None = None  # a seeded sample of the training windows (studies of many drafts)
    time_budget_min: float | None = None  # stop after the epoch that crosses this budget
    seed: int = 0
    threads: int | None = None
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
        multi = self.kind == "hass" or (self.kind == "padrec" and self.padrec_base == "hass")
        return self.hass_steps if multi else 1

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


def _positions(batch) -> torch.Tensor:
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


def draft_loss(kind: str, model, head, batch, H: torch.Tensor, cfg: DraftTrainConfig, steps: int | None = None):
    """Loss, the draft's logits at the SID positions for each unrolled step (list of [N, V]) and the target's
    ([N, V]). `steps` overrides the configured unroll (validation looks deeper than EAGLE trains)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    M = _positions(batch)
    with torch.no_grad():
        t_logits = head(H[:, :-1][M]).float()
    if kind in FEATURE_KINDS:
        from padrec.drafts.hass import unrolled_features

        feats = torch.zeros_like(H)
        feats[:, 1:] = H[:, :-1]  # the state before each token; zero before BOS
        outs = unrolled_features(model, ids, feats, am, steps or cfg.steps)
        loss, weight, d_logits = 0.0, 0.0, []
        for j, out in enumerate(outs):
            f_hat = out[:, :-1][M]
            logits = model.logits(f_hat).float()
            w = cfg.step_decay ** j
            loss = loss + w * (F.smooth_l1_loss(f_hat, H[:, :-1][M]) + cfg.w_token * soft_ce(logits, t_logits, cfg.hass_topk))
            weight += w
            d_logits.append(logits)
        loss = loss / weight
    else:
        from padrec.drafts.lm_draft import distill_loss

        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1][M].float()
        hard = batch["labels"][:, 1:][M]
        loss = distill_loss(logits, t_logits, cfg.temperature, hard, cfg.w_hard)
        d_logits = [logits]
    return loss, d_logits, t_logits


@torch.no_grad()
def validate(kind, model, head, examples, feats: TargetFeatures, cfg: DraftTrainConfig, levels: int,
             batch_size: int = 128, steps: int | None = None) -> dict:
    """Loss and top-1 agreement with the target over the labelled positions of `examples`, per unrolled step
    (`steps`, default max(trained steps, VALID_STEPS); 1 for an LM draft) and per SID level at step 1."""
    model.eval()
    steps = (steps or max(cfg.steps, VALID_STEPS)) if kind in FEATURE_KINDS else 1
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
        M = _positions(batch)
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


def _new_model(kind: str, target, vocab_size: int, cfg: DraftTrainConfig, levels: int):
    if kind == "padrec":
        from padrec.drafts.padrec import PadRecDraftModel, PositionConfig

        position = PositionConfig(levels=levels, ipe=cfg.ipe, spe=cfg.spe, gate=cfg.gate,
                                  learn_alpha=cfg.learn_alpha, trained_depths=cfg.steps)
        model = PadRecDraftModel.from_target(target, position, cfg.eagle_intermediate, cfg.freeze_embed,
                                             seed=cfg.seed)
        return model, model.model_config()
    if kind in FEATURE_KINDS:
        from padrec.drafts.eagle import EagleDraftModel

        model = EagleDraftModel.from_target(target, cfg.eagle_intermediate, cfg.freeze_embed, seed=cfg.seed)
        return model, model.model_config()
    from padrec.drafts.lm_draft import LMDraftConfig, build_lm_draft

    mc = LMDraftConfig(vocab_size, cfg.lm_layers, cfg.lm_hidden, cfg.lm_heads, cfg.lm_intermediate)
    return build_lm_draft(mc, seed=cfg.seed), mc.to_dict()


def _warm_start(run, model, source: str, identity: dict) -> dict:
    """Copy the weights of the run's trained draft `source` into `model`; returns what the new draft's metadata
    records about where it started. Only a PAD-Rec module may be missing from the source (it then starts as the
    identity map); anything else that does not match is an error, never a silent partial load."""
    path = draft_dir(run, source)
    meta = read_draft_meta(path)
    if meta.get("identity") != identity:
        raise PadrecError(f"draft {source!r} was trained for another target than this run's; cannot start from it")
    if meta["kind"] not in FEATURE_KINDS:
        raise PadrecError(f"draft {source!r} is a {meta['kind']!r} draft; a warm start needs a feature draft")
    state = load_draft_weights(path, meta).state_dict()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another draft architecture
        raise PadrecError(f"draft {source!r} does not fit the new draft: {e}") from e
    if unexpected or any(not k.startswith("position.") for k in missing):
        raise PadrecError(f"draft {source!r} does not fit the new draft (missing {sorted(missing)}, "
                          f"unexpected {sorted(unexpected)})")
    if missing:
        model.position.start_as_identity()
    return {"draft": source, "kind": meta["kind"], "files": meta.get("files")}


def train_draft(run, cfg: DraftTrainConfig, resume: bool = True, progress: bool = True,
                feature_pool: dict | None = None) -> dict:
    """Train (or resume training of) a draft for the run's target. Returns the history and where it was saved.

    `feature_pool`: a dict shared by several calls in one process (a study training many drafts of one run):
    the target, the examples and the cached target features are computed once and reused."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = dist.world_size()
    progress = progress and dist.is_main()
    name = cfg.draft_name
    best_path, last_path = draft_dir(run, name), last_dir(run, name)
    identity = target_identity(run)
    pool_key = (str(run.path), identity["target_hash"], cfg.seed, cfg.max_valid_cases, cfg.max_train_examples,
                cfg.feature_cache_mb, cfg.list_train_users)
    if feature_pool is not None and pool_key in feature_pool:
        target, train_examples, valid_examples, train_feats, valid_feats = feature_pool[pool_key]
    else:
        target = run.load_target()
        target.eval()
        for p in target.parameters():
            p.requires_grad_(False)
        if identity["target_hidden_size"] != target.config.get_text_config().hidden_size:
            raise PadrecError(f"target config.json and the loaded target disagree on the hidden size ({run.target_dir})")
        train_examples, valid_examples = run_examples(run, cfg.max_valid_cases, cfg.seed)
        if cfg.max_train_examples and len(train_examples) > cfg.max_train_examples:
            train_examples = random.Random(cfg.seed).sample(train_examples, cfg.max_train_examples)
        if cfg.list_train_users:
            from padrec.drafts.target_lists import train_list_examples

            train_examples = train_examples + train_list_examples(run, target, cfg.list_train_users, seed=cfg.seed,
                                                                  progress=progress)
        valid_examples = dist.shard(valid_examples)  # under torchrun each rank validates its share
        check_head_on_features(target, collate(train_examples[: min(8, len(train_examples))]))
        train_feats = TargetFeatures(target, train_examples, cfg.feature_cache_mb)
        valid_feats = TargetFeatures(target, valid_examples, cfg.feature_cache_mb)
        if feature_pool is not None:
            feature_pool[pool_key] = (target, train_examples, valid_examples, train_feats, valid_feats)
    head = target.get_output_embeddings()
    list_examples = list_feats = None
    if cfg.list_valid_users:
        from padrec.drafts.target_lists import greedy_list_examples

        list_examples = dist.shard(greedy_list_examples(run, target, "valid", cfg.list_valid_users, seed=cfg.seed))
        list_feats = TargetFeatures(target, list_examples, cfg.feature_cache_mb)
    aligner = None
    if cfg.align:
        from padrec.decoding.trie import ItemTrie
        from padrec.drafts.alignment import BeamAligner

        aligner = BeamAligner(target, ItemTrie(run.sids.all_item_tokens()), train_examples, cfg.align,
                              cfg.align_topk, cfg.align_examples, cfg.seed)
    lengths = [len(ids) for ids, _ in train_examples]
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    state, started_from = None, None
    if resume and (last_path / "train_state.pt").is_file():
        meta = read_draft_meta(last_path)
        # a field added to the config since that run was saved counts as its default
        if {**asdict(DraftTrainConfig()), **meta.get("config", {})} != asdict(cfg):
            raise PadrecError(f"{last_path} holds an interrupted draft training with different settings; "
                              "pass the same settings to resume, or resume=False (--no-resume) to start over")
        if meta.get("identity") != identity:
            raise PadrecError(f"{last_path} holds an interrupted draft training for another target; "
                              "start over with resume=False (--no-resume)")
        model = load_draft_weights(last_path, meta)
        model_config = meta["model_config"]
        state = torch.load(last_path / "train_state.pt", weights_only=True)
        history = json.loads(state["history_json"])
        started_from = meta.get("started_from")
        start_epoch = int(state["epoch"]) + 1
    else:
        model, model_config = _new_model(cfg.kind, target, identity["vocab_size"], cfg, run.sids.vocab.levels)
        history, start_epoch = [], 0
        if cfg.init_from is not None:
            started_from = _warm_start(run, model, cfg.init_from, identity)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    n_params = sum(p.numel() for p in params)

    best = max((h.get("valid_score", h["valid_agreement"]) for h in history), default=-1.0)
    bad_epochs = 0
    for h in history:
        bad_epochs = 0 if h["improved"] else bad_epochs + 1
    stopped = history[-1].get("stop_reason") if history else None
    base_meta = {"kind": cfg.kind, "name": name, "config": asdict(cfg), "model_config": model_config,
                 "identity": identity, "n_trainable_params": n_params,
                 **({"started_from": started_from} if started_from else {})}

    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        t0 = time.time()
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        run_loss, run_n, tokens = 0.0, 0, 0
        for b, idx in enumerate(bar):
            step = epoch * steps_per_epoch + b
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, total_steps, cfg.lr, cfg.warmup_steps)
            mine = dist.shard(idx)  # under torchrun: this rank's part of the same global batch
            batch = collate([train_examples[i] for i in mine]) if mine else None
            n_local = int(_positions(batch).sum()) if mine else 0
            n_global = int(dist.all_reduce_sum([n_local])[0]) if world > 1 else n_local
            if n_global == 0:
                continue
            opt.zero_grad(set_to_none=True)
            if n_local:
                loss, _, _ = draft_loss(cfg.kind, model, head, batch, train_feats(mine, batch), cfg)
                if aligner is not None:
                    loss = loss + cfg.align_weight * aligner.loss(cfg.kind, model, head, mine, cfg)
                # the losses are means over this rank's positions: weighted by its share, the ranks' gradients
                # sum to the gradient of the global batch's mean
                (loss * (n_local / n_global) if world > 1 else loss).backward()
            else:  # nothing here this step, but the gradient sum below needs this rank's (zero) part
                loss = torch.zeros(())
                sum(p.sum() for p in params).mul(0.0).backward()
            dist.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            run_loss += loss.item() * n_local  # position-weighted: the same epoch mean however batches are split
            run_n += n_local
            tokens += int(batch["attention_mask"].sum()) if mine else 0
            if b % 20 == 0:
                bar.set_postfix(loss=f"{run_loss / max(1, run_n):.4f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        val = validate(cfg.kind, model, head, valid_examples, valid_feats, cfg, run.sids.vocab.levels)
        if list_examples is not None:
            lv = validate(cfg.kind, model, head, list_examples, list_feats, cfg, run.sids.vocab.levels)
            val.update(list_agreement_by_step=lv["valid_agreement_by_step"],
                       list_agreement_per_level=lv["valid_agreement_per_level"], valid_score=lv["valid_score"])
        seconds = time.time() - t0
        if world > 1:  # the slowest rank's time (every rank must agree on a time-budget stop) and the global mean
            seconds = dist.all_reduce_max(seconds)
            run_loss, run_n, tokens = dist.all_reduce_sum([run_loss, run_n, tokens])
        improved = val["valid_score"] > best + 1e-6
        bad_epochs = 0 if improved else bad_epochs + 1
        elapsed = sum(h["seconds"] for h in history) + seconds
        reason = stop_reason(bad_epochs, cfg.patience, elapsed, cfg.time_budget_min)
        entry = {"epoch": epoch + 1, "train_loss": run_loss / max(1, run_n), **val, "improved": improved,
                 "seconds": seconds, "tokens_per_s": tokens / seconds, "features_cached": train_feats.enabled,
                 "stop_reason": reason}
        history.append(entry)
        if progress:
            tqdm.write(
                f"{name} epoch {epoch + 1}: train {entry['train_loss']:.4f}  valid {val['valid_loss']:.4f}  "
                f"agree {'/'.join(f'{a:.3f}' for a in val['valid_agreement_by_step'])}"
                + (f"  lists {'/'.join(f'{a:.3f}' for a in val['list_agreement_by_step'])}"
                   if list_examples is not None else "")
                + f"{'  *best*' if improved else ''}  ({seconds:.0f}s)"
                + (f"  stop: {reason}" if reason else "")
            )
        meta = {**base_meta, "epoch": epoch + 1, "history": history}
        if improved:
            best = val["valid_score"]
        if dist.is_main():  # every rank holds the same weights; one writes them
            if improved:
                save_draft_dir(best_path, model.state_dict(), {**meta, **val})
            train_state = {"optimizer": opt.state_dict(), "epoch": epoch, "history_json": json.dumps(history)}
            save_draft_dir(last_path, model.state_dict(), meta, train_state=train_state)
        dist.barrier()
        stopped = reason

    if not best_path.exists():
        raise PadrecError("draft training produced no checkpoint (zero epochs?)")
    return {"history": history, "n_params": n_params, "train_seconds": sum(h["seconds"] for h in history),
            "path": str(best_path), "name": name}
