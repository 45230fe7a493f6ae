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

import random
from dataclasses import asdict, dataclass

import torch

from padrec import PadrecError
from padrec.decoding.trie import ItemTrie
from padrec.drafts.alignment import BeamAligner
from padrec.drafts.kinds import DRAFT_KINDS
from padrec.drafts.losses import sid_positions
from padrec.drafts.objective import TargetFeatures, check_head_on_features, draft_loss, validate
from padrec.drafts.registry import (
    draft_dir,
    last_dir,
    load_draft_weights,
    read_draft_meta,
    save_draft_dir,
    target_identity,
)
from padrec.drafts.target_lists import greedy_list_examples, train_list_examples
from padrec.drafts.train_config import DraftTrainConfig
from padrec.training import distributed as dist
from padrec.training.loop import Resumed, Step, TrainTask, run_training
from padrec.training.sequences import collate, run_examples


def _warm_start(run, model, source: str, identity: dict) -> dict:
    """Copy the weights of the run's trained draft `source` into `model`; returns what the new draft's metadata
    records about where it started. Only a PAD-Rec module may be missing from the source (it then starts as the
    identity map); anything else that does not match is an error, never a silent partial load."""
    path = draft_dir(run, source)
    meta = read_draft_meta(path)
    if meta.get("identity") != identity:
        raise PadrecError(f"draft {source!r} was trained for another target than this run's; cannot start from it")
    if not DRAFT_KINDS[meta["kind"]].features:
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


class DraftTask(TrainTask):
    """A draft against the run's target: its loss on the target's features over the training windows, scored by
    its top-1 agreement with the target (averaged over unrolled steps; along the target's lists when scored)."""

    betas = (0.9, 0.95)
    min_delta = 1e-6

    def __init__(self, run, cfg: DraftTrainConfig, model, data: "_DraftData", meta: dict):
        self.run, self.cfg, self.model, self.data, self.base_meta = run, cfg, model, data, meta
        self.label = f"{cfg.draft_name} "
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lengths = [len(ids) for ids, _ in data.train_examples]
        self.head = data.target.get_output_embeddings()
        self.best_path, self.last_path = draft_dir(run, cfg.draft_name), last_dir(run, cfg.draft_name)

    def step(self, idx: list[int]) -> Step | None:
        cfg, d = self.cfg, self.data
        mine = dist.shard(idx)  # under torchrun: this rank's part of the same global batch
        batch = collate([d.train_examples[i] for i in mine]) if mine else None
        n_local = int(sid_positions(batch).sum()) if mine else 0
        n_global = int(dist.all_reduce_sum([n_local])[0]) if dist.world_size() > 1 else n_local
        if n_global == 0:
            return None
        if not n_local:  # nothing here this step, but the gradient sum needs this rank's (zero) part
            return Step(sum(p.sum() for p in self.params).mul(0.0), 0.0, 0, 0)
        loss, _, _ = draft_loss(cfg.kind, self.model, self.head, batch, d.train_feats(mine, batch), cfg)
        if d.aligner is not None:
            loss = loss + cfg.align_weight * d.aligner.loss(cfg.kind, self.model, self.head, mine, cfg)
        # the losses are means over this rank's positions: weighted by its share, the ranks' gradients sum to the
        # gradient of the global batch's mean; the train loss is position-weighted likewise
        scaled = loss * (n_local / n_global) if dist.world_size() > 1 else loss
        return Step(scaled, loss.item() * n_local, n_local, int(batch["attention_mask"].sum()))

    def validate(self) -> dict:
        cfg, d, levels = self.cfg, self.data, self.run.sids.vocab.levels
        val = validate(cfg.kind, self.model, self.head, d.valid_examples, d.valid_feats, cfg, levels)
        if d.list_examples is not None:
            lv = validate(cfg.kind, self.model, self.head, d.list_examples, d.list_feats, cfg, levels)
            val.update(list_agreement_by_step=lv["valid_agreement_by_step"],
                       list_agreement_per_level=lv["valid_agreement_per_level"], valid_score=lv["valid_score"])
        return val

    def score(self, entry: dict) -> float:
        return entry.get("valid_score", entry["valid_agreement"])  # drafts saved before valid_score existed

    def entry_extra(self) -> dict:
        return {"features_cached": self.data.train_feats.enabled}

    def describe(self, entry: dict) -> str:
        lists = entry.get("list_agreement_by_step")
        return (f"train {entry['train_loss']:.4f}  valid {entry['valid_loss']:.4f}  "
                f"agree {'/'.join(f'{a:.3f}' for a in entry['valid_agreement_by_step'])}"
                + (f"  lists {'/'.join(f'{a:.3f}' for a in lists)}" if lists is not None else ""))

    def save(self, epoch: int, history: list[dict], improved: bool, entry: dict, train_state: dict) -> None:
        meta = {**self.base_meta, "epoch": epoch + 1, "history": history}
        if improved:
            metrics = {k: v for k, v in entry.items() if k.startswith(("valid_", "list_agreement"))}
            save_draft_dir(self.best_path, self.model.state_dict(), {**meta, **metrics})
        save_draft_dir(self.last_path, self.model.state_dict(), meta, train_state=train_state)


@dataclass
class _DraftData:
    """The target and what the draft learns and is validated on (the first five can be shared between drafts)."""

    target: torch.nn.Module
    train_examples: list
    valid_examples: list  # this rank's share
    train_feats: TargetFeatures
    valid_feats: TargetFeatures
    list_examples: list | None = None
    list_feats: TargetFeatures | None = None
    aligner: BeamAligner | None = None


def _draft_data(run, cfg: DraftTrainConfig, identity: dict, progress: bool, feature_pool: dict | None) -> _DraftData:
    pool_key = (str(run.path), identity["target_hash"], cfg.seed, cfg.max_valid_cases, cfg.max_train_examples,
                cfg.feature_cache_mb, cfg.list_train_users)
    if feature_pool is not None and pool_key in feature_pool:
        data = _DraftData(*feature_pool[pool_key])
    else:
        target = run.load_target()
        target.eval()
        for p in target.parameters():
            p.requires_grad_(False)
        if identity["target_hidden_size"] != target.config.get_text_config().hidden_size:
            raise PadrecError(f"target config.json and the loaded target disagree on the hidden size "
                              f"({run.target_dir})")
        train_examples, valid_examples = run_examples(run, cfg.max_valid_cases, cfg.seed)
        if cfg.max_train_examples and len(train_examples) > cfg.max_train_examples:
            train_examples = random.Random(cfg.seed).sample(train_examples, cfg.max_train_examples)
        if cfg.list_train_users:
            train_examples = train_examples + train_list_examples(run, target, cfg.list_train_users, seed=cfg.seed,
                                                                  progress=progress)
        valid_examples = dist.shard(valid_examples)  # under torchrun each rank validates its share
        check_head_on_features(target, collate(train_examples[: min(8, len(train_examples))]))
        data = _DraftData(target, train_examples, valid_examples,
                          TargetFeatures(target, train_examples, cfg.feature_cache_mb),
                          TargetFeatures(target, valid_examples, cfg.feature_cache_mb))
        if feature_pool is not None:
            feature_pool[pool_key] = (data.target, data.train_examples, data.valid_examples, data.train_feats,
                                      data.valid_feats)
    if cfg.list_valid_users:
        data.list_examples = dist.shard(greedy_list_examples(run, data.target, "valid", cfg.list_valid_users,
                                                             seed=cfg.seed))
        data.list_feats = TargetFeatures(data.target, data.list_examples, cfg.feature_cache_mb)
    if cfg.align:
        data.aligner = BeamAligner(data.target, ItemTrie(run.sids.all_item_tokens()), data.train_examples, cfg.align,
                                   cfg.align_topk, cfg.align_examples, cfg.seed)
    return data


def _resume_draft(run, cfg: DraftTrainConfig, identity: dict, resume: bool, target):
    """(model, model_config, started_from, Resumed): the interrupted training's last state, or a new draft."""
    last_path = last_dir(run, cfg.draft_name)
    if not (resume and (last_path / "train_state.pt").is_file()):
        model, model_config = DRAFT_KINDS[cfg.kind].new(target, identity["vocab_size"], cfg, run.sids.vocab)
        started_from = _warm_start(run, model, cfg.init_from, identity) if cfg.init_from is not None else None
        return model, model_config, started_from, Resumed()
    meta = read_draft_meta(last_path)
    # a field added to the config since that run was saved counts as its default
    if {**asdict(DraftTrainConfig()), **meta.get("config", {})} != asdict(cfg):
        raise PadrecError(f"{last_path} holds an interrupted draft training with different settings; "
                          "pass the same settings to resume, or resume=False (--no-resume) to start over")
    if meta.get("identity") != identity:
        raise PadrecError(f"{last_path} holds an interrupted draft training for another target; "
                          "start over with resume=False (--no-resume)")
    state = torch.load(last_path / "train_state.pt", weights_only=True)
    resumed = Resumed.from_state(state)
    return load_draft_weights(last_path, meta), meta["model_config"], meta.get("started_from"), resumed


def train_draft(run, cfg: DraftTrainConfig, resume: bool = True, progress: bool = True,
                feature_pool: dict | None = None) -> dict:
    """Train (or resume training of) a draft for the run's target. Returns the history and where it was saved.

    `feature_pool`: a dict shared by several calls in one process (a study training many drafts of one run):
    the target, the examples and the cached target features are computed once and reused."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    identity = target_identity(run)
    data = _draft_data(run, cfg, identity, progress and dist.is_main(), feature_pool)
    model, model_config, started_from, resumed = _resume_draft(run, cfg, identity, resume, data.target)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {"kind": cfg.kind, "name": cfg.draft_name, "config": asdict(cfg), "model_config": model_config,
            "identity": identity, "n_trainable_params": n_params,
            **({"started_from": started_from} if started_from else {})}
    model.train()
    task = DraftTask(run, cfg, model, data, meta)
    history = run_training(task, cfg, resumed, progress)
    if not task.best_path.exists():
        raise PadrecError("draft training produced no checkpoint (zero epochs?)")
    return {"history": history, "n_params": n_params, "train_seconds": sum(h["seconds"] for h in history),
            "path": str(task.best_path), "name": cfg.draft_name}
