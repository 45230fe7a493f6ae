"""The recommendation service behind the HTTP app: request validation, and model work on one worker thread.

`prepare` runs on the event loop (dictionary look-ups only) and turns a request into a `Prepared` job or raises
`RequestError` with the HTTP status and a message that names the problem. `recommend` queues the job on the
`ModelWorker` and awaits it without blocking the loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import generate_list_batch
from padrec.decoding.beam import beam_search_items_batch
from padrec.evaluation.evaluate import RankConfig
from padrec.drafts.registry import default_draft, list_drafts
from padrec.serving.batching import Job, ModelWorker, ShuttingDown
from padrec.serving.schemas import InfoResponse, RecommendedItem, RecommendRequest, RecommendResponse, TargetInfo
from padrec.speculative.beam import BeamSpecConfig

MODES = ["list", "beam"]
DECODERS = ["ar", "sd"]


@dataclass(frozen=True)
class ServeSettings:
    max_history: int = 200  # items accepted in a request's history (the model itself reads the run's last N)
    max_k: int = 100  # upper bound of k, besides the catalogue size
    # greedy AR requests decoded together at most. 1 (default): off, every answer is the batch-1 answer. > 1: about
    # twice the throughput under load, but float32 rounding differs between a padded batch and batch 1, so where two
    # logits tie to ~1e-5 a list can differ from its batch-1 answer (see padrec.serving's docstring)
    max_batch: int = 1
    threads: int | None = None  # torch CPU threads of the model thread
    # largest request body accepted (413 beyond); None: room for max_history ids of up to ~100 characters each
    max_body_bytes: int | None = None

    def __post_init__(self):
        for name in ("max_history", "max_k", "max_batch"):
            if getattr(self, name) < 1:
                raise PadrecError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise PadrecError(f"threads must be >= 1, got {self.threads}")
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise PadrecError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes if self.max_body_bytes is not None else 4096 + 104 * self.max_history


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Prepared:
    history: tuple[int, ...]  # dense ids, full history (exclusion uses all of it)
    prompt: tuple[int, ...]
    mode: str
    decoder: str
    draft: str | None
    k: int
    temperature: float
    seed: int | None
    exclude_history: bool
    beam_spec: BeamSpecConfig | None = None  # mode=beam, decoder=sd

    @property
    def batch_key(self):
        # only greedy AR requests batch: the batched sampler draws a different random stream than batch-1
        # decoding (a seed would stop reproducing its list), and speculative decoding is batch-1 by design
        if self.decoder != "ar" or self.temperature > 0:
            return None
        return (self.mode, self.k, self.exclude_history)


@dataclass(frozen=True)
class Outcome:
    items: list[int]
    scores: list[float] | None = None
    tau: float | None = None
    fallback: bool | None = None
    lossless: bool | None = None


class RecommendService:
    def __init__(self, recommender, settings: ServeSettings | None = None):
        self.rec = recommender
        self.settings = settings or ServeSettings()
        self.run = recommender.run
        self.items = self.run.dataset.items
        self.num_items = recommender.trie.num_items
        self.k_limit = min(self.num_items, self.settings.max_k)
        self.drafts = list_drafts(self.run)
        self.default_draft = default_draft(self.run)
        self._info = self._build_info()
        recommender.to_dense([self.items[0].raw_id])  # builds the id map now, not inside the first request
        self._worker: ModelWorker | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, settings: ServeSettings | None = None) -> "RecommendService":
        from padrec.api import Recommender

        settings = settings or ServeSettings()
        return cls(Recommender(run_dir, threads=settings.threads), settings)

    # ------------------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._worker = ModelWorker(self._run_single, self._run_batch, self.settings.max_batch,
                                       on_start=self._init_thread)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _init_thread(self) -> None:
        # intra-op thread settings are per OS thread in OpenMP builds; set them where the model runs
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)

    def queued(self) -> int:
        return self._worker.qsize() if self._worker is not None else 0

    # ------------------------------------------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------------------------------------------
    def info(self) -> InfoResponse:
        return self._info

    def prepare(self, req: RecommendRequest) -> Prepared:
        s = self.settings
        if not req.history:
            raise RequestError(422, "history is empty: give at least one item id")
        if len(req.history) > s.max_history:
            raise RequestError(422, f"history has {len(req.history)} items; this server accepts at most "
                                    f"{s.max_history} (the model reads the last {self.run.info.max_history})")
        try:
            history = self.rec.to_dense(req.history)
        except PadrecError as e:
            raise RequestError(422, str(e)) from None
        if not 1 <= req.k <= self.k_limit:
            raise RequestError(422, f"k={req.k} is out of range: 1..{self.k_limit} (catalogue: {self.num_items} "
                                    f"items, server limit: {s.max_k})")
        if req.exclude_history:
            left = self.num_items - len(set(history))
            if req.k > left:
                raise RequestError(422, f"k={req.k} but only {left} items remain after excluding the history's "
                                        f"{self.num_items - left} distinct items")
        draft = self._check_draft(req)
        spec = self._beam_spec(req)
        if req.temperature > 0 and req.mode == "beam":
            raise RequestError(422, "temperature applies to list mode; beam search is deterministic "
                                    "(use temperature=0 or mode='list')")
        seed = req.seed
        if req.temperature > 0 or req.verify == "relaxed":
            seed = random.SystemRandom().randrange(2**63) if seed is None else seed
        elif seed is not None:
            raise RequestError(422, "seed only applies to sampling (temperature > 0, or verify='relaxed')")
        return Prepared(tuple(history), tuple(self.run.prompt(history)), req.mode, req.decoder, draft, req.k,
                        req.temperature, seed, req.exclude_history, spec)

    def _check_draft(self, req: RecommendRequest) -> str | None:
        draft = None
        if req.decoder == "sd":
            draft = req.draft or self.default_draft
            if draft is None:
                raise RequestError(404, f"decoder 'sd' needs a trained draft and run {self.run.path} has none; "
                                        f"train one with `padrec train-draft --run {self.run.path}`")
            if draft not in self.drafts:
                raise RequestError(404, f"unknown draft {draft!r}: this run has {', '.join(self.drafts)}")
        elif req.draft is not None:
            raise RequestError(422, "draft is only used with decoder='sd'")
        return draft

    @staticmethod
    def _beam_spec(req: RecommendRequest) -> BeamSpecConfig | None:
        given = [f for f in ("verify", "draft_beams", "gamma") if getattr(req, f) is not None]
        if not (req.mode == "beam" and req.decoder == "sd"):
            if given:
                raise RequestError(422, f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to speculative "
                                        "beam search only (mode='beam', decoder='sd')")
            return None
        try:
            return BeamSpecConfig.for_beam_width(req.k, req.draft_beams, req.gamma, req.verify or "strict")
        except PadrecError as e:
            raise RequestError(422, str(e)) from None

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        t0 = time.perf_counter()
        p = self.prepare(req)
        if self._worker is None:
            raise ShuttingDown("the model worker is not running")
        out, batch = await asyncio.wrap_future(self._worker.submit(Job(p, p.batch_key)))
        ranked = [
            RecommendedItem(rank=r + 1, item=self.items[i].raw_id, title=self.items[i].title,
                            score=None if out.scores is None else out.scores[r])
            for r, i in enumerate(out.items[: p.k])
        ]
        return RecommendResponse(items=ranked, mode=p.mode, decoder=p.decoder, draft=p.draft, k=p.k,
                                 temperature=p.temperature, seed=p.seed, tau=out.tau,
                                 verify=p.beam_spec.verify if p.beam_spec else None, lossless=out.lossless,
                                 fallback=out.fallback, batch_size=batch,
                                 latency_ms=1000 * (time.perf_counter() - t0))

    # ------------------------------------------------------------------------------------------------------
    # model work (worker thread only)
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _rank_config(p: Prepared) -> RankConfig:
        sample = p.temperature > 0
        return RankConfig(mode=p.mode, beam_size=p.k, n_items=p.k, do_sample=sample,
                          temperature=p.temperature if sample else 1.0, exclude_history=p.exclude_history)

    def _draft(self, name: str):
        try:
            return self.rec.draft(name)
        except PadrecError as e:  # a draft on disk that fails to load is the server's problem, not the client's
            raise RequestError(503, f"draft {name!r} cannot be used: {e}") from None

    def _run_single(self, p: Prepared) -> Outcome:
        """One request through the same Recommender calls as the Python API."""
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        cfg = self._rank_config(p)
        if p.decoder == "sd":
            self._draft(p.draft)  # load failures become a 503 here; the Recommender keeps the loaded draft
            if p.mode == "beam":
                items, scores, stats = self.rec.recommend_speculative_beam(list(p.history), cfg, p.draft,
                                                                           p.beam_spec, generator=gen)
                return Outcome(items, scores, stats["tau"], stats["fallback"], stats["lossless"])
            items, tau = self.rec.recommend_speculative(list(p.history), cfg, p.draft, generator=gen)
            return Outcome(items, tau=tau, lossless=True)
        items, scores = self.rec.recommend_dense(list(p.history), cfg, generator=gen)
        return Outcome(items, scores)

    def _run_batch(self, ps: list[Prepared]) -> list[Outcome]:
        first = ps[0]  # same batch_key: same mode, k and exclusion; greedy AR
        prompts = [p.prompt for p in ps]
        with torch.inference_mode():
            if first.mode == "beam":
                excl = [p.history for p in ps] if first.exclude_history else None
                res = beam_search_items_batch(self.rec.model, prompts, self.rec.trie, first.k, first.k, len(ps), excl)
                return [Outcome(r.items, r.scores) for r in res]
            res = generate_list_batch(self.rec.model, prompts, self.rec.trie, self._rank_config(first).generation_config(),
                                      [p.history for p in ps], len(ps))
            return [Outcome(r.items) for r in res]

    def _build_info(self) -> InfoResponse:
        model = self.rec.model
        cfg = getattr(model.config, "text_config", None) or model.config
        archs = getattr(model.config, "architectures", None) or [type(model).__name__]
        return InfoResponse(
            dataset=self.run.info.dataset,
            items=self.num_items,
            target=TargetInfo(architecture=archs[0], layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size),
                              params=sum(p.numel() for p in model.parameters())),
            drafts=self.drafts,
            default_draft=self.default_draft,
            sid_scheme=dict(self.run.info.tokenizer),
            vocab_size=self.run.vocab_size,
            prompt_history=self.run.info.max_history,
            max_history=self.settings.max_history,
            max_k=self.k_limit,
            max_batch=self.settings.max_batch,
            modes=MODES,
            decoders=DECODERS,
        )
