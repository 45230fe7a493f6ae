"""A small Python API: load a trained run and recommend for raw item-id histories.

    from padrec.api import Recommender
    rec = Recommender("runs/demo")
    rec.recommend(["1955", "28"], k=10, mode="beam")   # -> [{"item": ..., "title": ..., "score": ...}, ...]
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import generate_list
from padrec.decoding.beam import beam_search_items
from padrec.decoding.trie import ItemTrie
from padrec.drafts.registry import default_draft, load_draft
from padrec.evaluation.evaluate import RankConfig
from padrec.run import Run
from padrec.speculative.beam import BeamSpecConfig, speculative_beam_search
from padrec.speculative.decoder import speculative_generate


class Recommender:
    def __init__(self, run_dir: str | Path, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.run = Run(run_dir)
        self.model = self.run.load_target()
        self.trie = ItemTrie(self.run.sids.all_item_tokens())
        self._drafts: dict = {}

    @cached_property
    def _dense_of_raw(self) -> dict[str, int]:
        return {str(it.raw_id): it.id for it in self.run.dataset.items}

    def to_dense(self, raw_history) -> list[int]:
        """Map the dataset's own item ids to dense ids, naming any unknown id."""
        if not raw_history:
            raise PadrecError("empty history: at least one item id is needed")
        out, unknown = [], []
        for raw in raw_history:
            dense = self._dense_of_raw.get(str(raw))
            (unknown.append(raw) if dense is None else out.append(dense))
        if unknown:
            shown = ", ".join(map(str, unknown[:10]))
            raise PadrecError(f"unknown item id(s) for dataset {self.run.info.dataset!r}: {shown}")
        return out

    def _check_length(self, cfg: RankConfig) -> None:
        if cfg.list_length > self.trie.num_items:
            raise PadrecError(f"k={cfg.list_length} is larger than the catalogue ({self.trie.num_items} items)")

    def recommend_dense(self, history: list[int], cfg: RankConfig,
                        generator: torch.Generator | None = None) -> tuple[list[int], list[float] | None]:
        """Beam mode: items and scores; list mode: items (sampled from `generator` when `cfg.do_sample`)."""
        self._check_length(cfg)
        prompt = self.run.prompt(history)
        with torch.inference_mode():
            if cfg.mode == "beam":
                res = beam_search_items(self.model, prompt, self.trie, cfg.beam_size, cfg.beam_size,
                                        history if cfg.exclude_history else ())
                return res.items, res.scores
            res = generate_list(self.model, prompt, self.trie, cfg.generation_config(), generator=generator,
                                history=history)
            return res.items, None

    def draft(self, name: str):
        if name not in self._drafts:
            self._drafts[name] = load_draft(self.run, name)
        return self._drafts[name]

    def recommend_speculative(self, history: list[int], cfg: RankConfig, draft: str, spec=None,
                              generator: torch.Generator | None = None) -> tuple[list[int], float]:
        """List mode through speculative decoding: the same list as `recommend_dense` (greedy: token for token),
        plus τ, the tokens committed per target forward."""
        prompt = self.run.prompt(history)
        loaded = self.draft(draft)  # loaded outside inference mode: its weights stay ordinary tensors
        with torch.inference_mode():
            res = speculative_generate(self.model, loaded, prompt, self.trie, cfg.generation_config(), spec,
                                       generator=generator, history=history)
        return res.items, res.stats["tau"]

    def recommend_speculative_beam(self, history: list[int], cfg: RankConfig, draft: str,
                                   spec: BeamSpecConfig | None = None,
                                   generator: torch.Generator | None = None) -> tuple[list[int], list[float], dict]:
        """Beam mode through speculative beam search. Strict verification (the default) returns what
        `recommend_dense` returns (items, order and scores); `stats` says whether this request was handed to plain
        beam search because float rounding could flip one of its choices (`fallback`). Relaxed verification
        (AtSpeed-R) samples: faster at best, not the same list (`lossless` False)."""
        spec = spec or BeamSpecConfig.for_beam_width(cfg.beam_size)
        if spec.beam_size != cfg.beam_size:
            raise PadrecError(f"the speculative beam width {spec.beam_size} differs from the request's {cfg.beam_size}")
        self._check_length(cfg)
        loaded = self.draft(draft)
        prompt = self.run.prompt(history)
        with torch.inference_mode():
            res = speculative_beam_search(self.model, loaded, prompt, self.trie, spec,
                                          history if cfg.exclude_history else (), generator)
        stats = {"tau": res.stats["tau"], "fallback": res.stats["near_tie_fallback"],
                 "lossless": spec.verify == "strict"}
        return res.items, res.scores, stats

    def recommend(self, raw_history, k: int = 10, mode: str = "beam", decoder: str = "ar", draft: str | None = None,
                  spec=None, **kw) -> list[dict]:
        """Top-`k` items for a history of the dataset's own ids, with titles (and scores in beam mode).
        decoder="sd": the same answer through speculative decoding with `draft` (default: eagle if the run has it,
        else its first; `spec`: a `SpecConfig` in list mode, a `BeamSpecConfig` in beam mode; default: the measured
        fastest strict settings)."""
        if k < 1:
            raise PadrecError(f"k must be >= 1, got {k}")
        if decoder not in ("ar", "sd"):
            raise PadrecError(f"decoder must be 'ar' or 'sd', got {decoder!r}")
        cfg = RankConfig(mode=mode, beam_size=max(k, kw.pop("beam_size", k)), n_items=k, **kw)
        history = self.to_dense(raw_history)
        draft = draft or default_draft(self.run)
        if decoder == "sd" and draft is None:
            raise PadrecError(f"decoder 'sd' needs a trained draft and run {self.run.path} has none")
        if decoder == "ar":
            items, scores = self.recommend_dense(history, cfg)
        elif mode == "beam":
            items, scores, _ = self.recommend_speculative_beam(history, cfg, draft, spec)
        else:
            (items, _), scores = self.recommend_speculative(history, cfg, draft, spec), None
        ds = self.run.dataset
        return [
            {"item": ds.items[i].raw_id, "title": ds.items[i].title, **({"score": scores[r]} if scores else {})}
            for r, i in enumerate(items[:k])
        ]
