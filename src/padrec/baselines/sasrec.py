"""SASRec (Kang & McAuley, 2018) as a baseline: a causal transformer over item-id embeddings, trained with full-softmax
cross-entropy over the catalogue at every position of each user's training items, dropout, early stopping on
validation Recall@10, on the loop the target and drafts use (`training/loop.py`).

Saved as `<dir>/model.safetensors` + `<dir>/sasrec.json` (config, dataset, catalogue size, history, validation
metrics); `<dir>/.last/` holds the last epoch and the optimizer state for resuming.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from padrec import PadrecError
from padrec.data.dataset import Dataset
from padrec.metrics import ranking_metrics
from padrec.files import atomic_write_text
from padrec.training.loop import LoopConfig, Resumed, Step, TrainTask, run_training

META = "sasrec.json"
WEIGHTS = "model.safetensors"


@dataclass
class SASRecConfig(LoopConfig):
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 0
    patience: int = 10  # epochs without validation Recall@10 improvement
    max_valid_cases: int = 3000
    layers: int = 2
    hidden: int = 64
    heads: int = 1
    dropout: float = 0.5
    max_len: int = 50  # most recent items a sequence keeps


class SASRec(nn.Module):
    """Item ids are shifted by one: 0 is padding. Sequences are left-padded (at most max_len long), so the last
    position is the query."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden
        self.n_items, self.max_len = n_items, cfg.max_len
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, dim_feedforward=d, dropout=cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.heads = cfg.heads
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, T] shifted ids -> [B, T, d] states (position t has seen items 0..t)."""
        B, T = seqs.shape
        real = seqs > 0
        # positions count back from the end (the last item is always max_len - 1), so an item's position does not
        # depend on how much padding its batch needs
        pos = self.pos(torch.arange(self.max_len - T, self.max_len, device=seqs.device))
        h = self.item(seqs) * math.sqrt(self.item.embedding_dim) + pos
        h = self.drop(h) * real[..., None]
        # causal over real items; a padding query sees only itself, so no row of the softmax is empty
        allowed = torch.ones(T, T, dtype=torch.bool, device=seqs.device).tril() & real[:, None, :]
        allowed |= torch.eye(T, dtype=torch.bool, device=seqs.device)
        mask = (~allowed).repeat_interleave(self.heads, dim=0)
        return self.norm(self.encoder(h, mask=mask))

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """States -> scores over the catalogue's items (dense ids 0..n-1), with the item embeddings tied."""
        return states @ self.item.weight[1:].T


def _left_pad(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    """Dense item ids -> [B, T] shifted ids, each sequence's last max_len items right-aligned."""
    seqs = [s[-max_len:] for s in seqs]
    T = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            out[b, T - len(s):] = torch.tensor(s) + 1
    return out


@torch.no_grad()
def rank(model: SASRec, histories: list[tuple[int, ...]], k: int, batch_size: int = 256) -> list[list[int]]:
    """The top-k items (dense ids) after each history."""
    model.eval()
    out = []
    for s in range(0, len(histories), batch_size):
        seqs = _left_pad([list(h) for h in histories[s : s + batch_size]], model.max_len)
        scores = model.scores(model(seqs)[:, -1])
        out.extend(scores.topk(min(k, model.n_items), dim=-1).indices.tolist())
    return out


class SASRecTask(TrainTask):
    """Next-item cross-entropy over the catalogue at every real position, scored by validation Recall@10."""

    betas = (0.9, 0.98)

    def __init__(self, dataset: Dataset, cfg: SASRecConfig, model: SASRec, out: Path):
        self.dataset, self.cfg, self.model, self.out = dataset, cfg, model, out
        self.params = list(model.parameters())
        # each training sequence: its last max_len + 1 items (inputs = all but the last, targets = all but the first)
        self.sequences = [list(s[-(cfg.max_len + 1):]) for s in dataset.train_sequences() if len(s) >= 2]
        if not self.sequences:
            raise PadrecError(f"dataset {dataset.name!r} has no user with two training items: nothing to train on")
        self.lengths = [len(s) for s in self.sequences]
        cases = dataset.eval_cases("valid")  # a seeded sample, like the targets' validation
        self.valid = random.Random(cfg.seed).sample(cases, min(len(cases), cfg.max_valid_cases))
        self.label = "sasrec "

    def step(self, idx: list[int]) -> Step:
        batch = [self.sequences[i] for i in idx]
        inputs, targets = _left_pad([s[:-1] for s in batch], self.cfg.max_len), _left_pad([s[1:] for s in batch],
                                                                                           self.cfg.max_len)
        real = targets > 0
        states = self.model(inputs)[real]
        loss = nn.functional.cross_entropy(self.model.scores(states), targets[real] - 1)
        return Step(loss, loss.item(), 1.0, int(real.sum()))

    def validate(self) -> dict:
        if not self.valid:
            raise PadrecError(f"dataset {self.dataset.name!r} has no validation queries to stop on")
        ranked = rank(self.model, [c.history for c in self.valid], 20)
        m = ranking_metrics(ranked, [c.targets for c in self.valid])
        return {"valid_recall@10": m["recall@10"], "valid_ndcg@10": m["ndcg@10"]}

    def score(self, entry: dict) -> float:
        return entry["valid_recall@10"]

    def describe(self, entry: dict) -> str:
        return (f"train {entry['train_loss']:.4f}  valid R@10 {entry['valid_recall@10']:.4f}  "
                f"N@10 {entry['valid_ndcg@10']:.4f}")

    def save(self, epoch: int, history: list[dict], improved: bool, entry: dict, train_state: dict) -> None:
        meta = {"dataset": self.dataset.name, "n_items": self.dataset.num_items, "config": asdict(self.cfg),
                "epoch": epoch + 1, "history": history}
        if improved:
            _write(self.out, self.model, {**meta, "valid": {k: v for k, v in entry.items() if k.startswith("valid")}})
        _write(self.out / ".last", self.model, meta, train_state)


def _write(path: Path, model: SASRec, meta: dict, train_state: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path / WEIGHTS))
    if train_state is not None:
        torch.save(train_state, path / "train_state.pt")
    atomic_write_text(path / META, json.dumps(meta, indent=1))


def load_sasrec(path: Path, dataset: Dataset | None = None) -> tuple[SASRec, dict]:
    """A saved SASRec and its metadata; with `dataset`, checked to be trained on it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META).is_file():
        raise PadrecError(f"no trained SASRec in {path}: run `padrec baseline sasrec --dataset ...` first")
    meta = json.loads((path / META).read_text())
    if dataset is not None and (meta["dataset"], meta["n_items"]) != (dataset.name, dataset.num_items):
        raise PadrecError(f"the SASRec in {path} was trained on {meta['dataset']!r} ({meta['n_items']} items), not "
                          f"on {dataset.name!r} ({dataset.num_items} items)")
    model = SASRec(meta["n_items"], SASRecConfig(**meta["config"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.eval(), meta


def train_sasrec(dataset: Dataset, cfg: SASRecConfig, out: Path, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume) SASRec on the dataset's training sequences into `out`; returns its history."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    last = out / ".last"
    resumed = Resumed()
    if resume and (last / "train_state.pt").is_file():
        model, meta = load_sasrec(last, dataset)
        if meta["config"] != asdict(cfg):
            raise PadrecError(f"{last} holds an interrupted SASRec training with other settings; pass the same "
                              "settings to resume, or --no-resume to start over")
        state = torch.load(last / "train_state.pt", weights_only=True)
        resumed = Resumed.from_state(state)
    else:
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(cfg.seed)
        model = SASRec(dataset.num_items, cfg)
    history = run_training(SASRecTask(dataset, cfg, model, out), cfg, resumed, progress)
    return {"history": history, "train_seconds": sum(h["seconds"] for h in history), "path": str(out)}
