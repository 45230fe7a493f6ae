"""Training the target LM on users' chronological item sequences, with validation-based early stopping
and resume after interruption."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.files import atomic_write_text
from padrec.models.checkpoint import (
    load_checkpoint,
    load_train_state,
    read_meta,
    recover_dir,
    save_checkpoint,
)
from padrec.models.target import adapt_base_model, build_target, get_preset, preset_dict
from padrec.run import Run
from padrec.training import distributed as dist
from padrec.training.loop import LoopConfig, Resumed, Step, TrainTask, run_training
from padrec.decoding.beam import beam_search_items_batch
from padrec.decoding.trie import ItemTrie
from padrec.metrics import ranking_metrics
from padrec.training.regularise import add_dropout
from padrec.training.sequences import IGNORE, collate, run_examples, valid_cases


SELECT_BY = ("loss", "recall@10", "ndcg@10")
VALID_BEAM = 20  # beam width (= list length) of the ranking validation


@dataclass
class TrainConfig(LoopConfig):
    """The target's training: the loop's settings (their defaults are the target's) and what to train."""

    preset: str = "small"
    weight_decay: float = 0.05
    base_model: str | None = None  # a local HF causal-LM checkpoint to fine-tune instead of a preset
    dropout: float = 0.0  # on the embeddings and each block's output, in training (training/regularise.py)
    # how the best epoch is chosen: validation loss, or the validation queries' ranking (beam search, top 20)
    select_by: str = "loss"

    def __post_init__(self):
        if self.select_by not in SELECT_BY:
            raise PadrecError(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        if not 0 <= self.dropout < 1:
            raise PadrecError(f"dropout must be in [0, 1), got {self.dropout}")


def validation_loss(model, examples, batch_size: int = 128) -> float:
    total, count = validation_sums(model, examples, batch_size)
    return total / max(1, count)


@torch.inference_mode()
def validation_sums(model, examples, batch_size: int = 128) -> tuple[float, int]:
    """Summed token loss and token count over `examples` (sums, so ranks' shares can be added up)."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(dev) for k, v in collate(examples[s : s + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += (labels != -100).sum().item()
    return total, count


def _label_tokens(example) -> int:
    return sum(1 for t in example[1][1:] if t != IGNORE)  # the first label is never predicted (shifted loss)


def _shard_step(net, examples, dev: torch.device) -> tuple[torch.Tensor, float, int, int]:
    """Forward this rank's shard of one global batch. Returns the loss to backpropagate, the shard's summed
    token loss, its label tokens and its input tokens.

    The ranks' gradients are summed (`training.loop`), so each rank backpropagates sum(own token losses) / N, with
    N the label tokens of the whole global batch (every rank holds the full batch list and counts N itself): the
    summed gradient is then exactly that of the global batch's mean token loss, the 1-process loss, however
    unevenly the tokens fall on the ranks. A rank whose shard is empty (a global batch smaller than W) still
    has to join the gradient all-reduce, so it runs one example with zero weight.
    """
    n_global = max(1, sum(_label_tokens(e) for e in examples))
    mine = dist.shard(examples)
    weight = 1.0 / n_global if mine else 0.0
    batch = {k: v.to(dev) for k, v in collate(mine or examples[:1]).items()}
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    if not mine:
        return loss_sum * weight, 0.0, 0, 0
    return loss_sum * weight, loss_sum.item(), sum(_label_tokens(e) for e in mine), int(batch["attention_mask"].sum())


def _new_model(run: Run, cfg: TrainConfig):
    if cfg.base_model:
        return adapt_base_model(cfg.base_model, run.sids.vocab.size, seed=cfg.seed)
    return build_target(run.sids.vocab.size, cfg.preset, seed=cfg.seed)


class TargetTask(TrainTask):
    """The target LM: next-token loss on the SID tokens of each training window, scored by validation loss."""

    betas = (0.9, 0.98)
    min_delta = 1e-4
    plans_epochs = True

    def __init__(self, run: Run, cfg: TrainConfig, model, train_examples, valid_examples):
        self.run, self.cfg, self.model = run, cfg, model
        if cfg.select_by != "loss":
            self.min_delta = 0.0
            self.cases = dist.shard(valid_cases(run, cfg.max_valid_cases, cfg.seed))
            self.trie = ItemTrie(run.sids.all_item_tokens())
        add_dropout(model, cfg.dropout)
        self.dev = dist.device()
        self.params = list(model.parameters())
        self.train_examples, self.valid_examples = train_examples, valid_examples
        self.lengths = [len(ids) for ids, _ in train_examples]
        self.meta = {**run.checkpoint_identity(), "train_config": asdict(cfg),
                     "preset": preset_dict(cfg.preset) if not cfg.base_model else None,
                     "n_params": sum(p.numel() for p in model.parameters())}

    def step(self, idx: list[int]) -> Step:
        examples = [self.train_examples[i] for i in idx]
        if dist.world_size() == 1:
            batch = collate(examples)
            loss = self.model(**batch).loss
            return Step(loss, loss.item(), 1.0, int(batch["attention_mask"].sum()))
        loss, shard_sum, _, n_tok = _shard_step(self.model, examples, self.dev)
        # the epoch's train loss is the mean over batches of each global batch's mean token loss
        n_global = max(1, sum(_label_tokens(e) for e in examples))
        return Step(loss, shard_sum / n_global, 1.0 / dist.world_size(), n_tok)

    def validate(self) -> dict:
        if dist.world_size() == 1:
            out = {"valid_loss": validation_loss(self.model, self.valid_examples)}
        else:
            total, count = dist.all_reduce_sum(validation_sums(self.model, dist.shard(self.valid_examples)))
            out = {"valid_loss": total / max(1, count)}
        if self.cfg.select_by != "loss":
            out.update(self._ranking())
        return out

    @torch.inference_mode()
    def _ranking(self) -> dict:
        """Recall@10 / NDCG@10 of beam search (top 20) over this rank's share of the validation queries."""
        self.model.eval()
        prompts = [self.run.prompt(c.history) for c in self.cases]
        res = beam_search_items_batch(self.model, prompts, self.trie, VALID_BEAM, VALID_BEAM) if prompts else []
        sums = [0.0, 0.0]
        for r, c in zip(res, self.cases):
            m = ranking_metrics([r.items], [c.targets], (10,))
            sums = [sums[0] + m["recall@10"], sums[1] + m["ndcg@10"]]
        recall, ndcg, n = dist.all_reduce_sum([*sums, len(self.cases)])
        return {"valid_recall@10": recall / max(1, n), "valid_ndcg@10": ndcg / max(1, n)}

    def score(self, entry: dict) -> float:
        if self.cfg.select_by == "loss":
            return -entry["valid_loss"]
        return entry[f"valid_{self.cfg.select_by}"]

    def describe(self, entry: dict) -> str:
        ranked = (f"  R@10 {entry['valid_recall@10']:.4f}  N@10 {entry['valid_ndcg@10']:.4f}"
                  if "valid_recall@10" in entry else "")
        return f"train {entry['train_loss']:.4f}  valid {entry['valid_loss']:.4f}{ranked}"

    def save(self, epoch: int, history: list[dict], improved: bool, entry: dict, train_state: dict) -> None:
        if improved:
            valid = {k: v for k, v in entry.items() if k.startswith("valid_")}
            save_checkpoint(self.model, self.run.target_dir, {**self.meta, "epoch": epoch + 1, **valid})
        save_checkpoint(self.model, self.run.target_last_dir, {**self.meta, "epoch": epoch + 1},
                        extra_tensors=train_state)
        atomic_write_text(self.run.path / "train_history.json", json.dumps(history, indent=2))


def _resume_target(run: Run, cfg: TrainConfig, resume: bool, progress: bool):
    """(model, Resumed): the interrupted run's last checkpoint and state, or a new model."""
    state = load_train_state(run.target_last_dir) if resume and run.target_last_dir.exists() else None
    if state is None:
        return _new_model(run, cfg), Resumed()
    # a field added to the config since that run was saved counts as its default
    if {**asdict(TrainConfig()), **read_meta(run.target_last_dir).get("train_config", {})} != asdict(cfg):
        raise PadrecError(
            f"{run.target_last_dir} holds an interrupted run with different settings; "
            "pass the same settings to resume, or --no-resume to start over"
        )
    model, _ = load_checkpoint(run.target_last_dir, expect=run.checkpoint_identity())
    resumed = Resumed.from_state(state)
    if progress:
        tqdm.write(f"resuming from {run.target_last_dir}: {resumed.start_epoch} epoch(s) done")
    return model, resumed


def train_target(run: Run, cfg: TrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume training of) the run's target. Returns the training history.

    Under torchrun (see `padrec.training.distributed`) every rank builds the same global batches and trains on
    its shard of each; the result equals a 1-process run with the same batch size up to float rounding. Rank 0
    alone writes checkpoints and the history and prints progress; the other ranks wait for it at a barrier.
    """
    if run.imported is not None:
        raise PadrecError(f"run {run.path}'s target is an imported checkpoint ({run.imported.manifest.model_dir}); "
                          "padrec does not retrain it. Train drafts for it with `padrec train-draft`")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.base_model:
        get_preset(cfg.preset)  # an unknown preset is the error to report, not a resume mismatch
    train_examples, valid_examples = run_examples(run, cfg.max_valid_cases, cfg.seed)
    if dist.is_main():  # a killed run may have left a checkpoint swap halfway; only the writer repairs it
        recover_dir(run.target_dir)
        recover_dir(run.target_last_dir)
        for tmp in run.path.glob(".train_history.json.*.tmp"):  # atomic_write_text's, of a killed write
            tmp.unlink(missing_ok=True)
    dist.barrier()
    model, resumed = _resume_target(run, cfg, resume, progress and dist.is_main())
    model.to(dist.device())
    task = TargetTask(run, cfg, model, train_examples, valid_examples)
    history = run_training(task, cfg, resumed, progress)
    if not run.target_dir.exists():
        raise PadrecError("training produced no checkpoint (zero epochs?)")
    return {"history": history, "n_params": task.meta["n_params"], "train_seconds": sum(h["seconds"] for h in history)}
