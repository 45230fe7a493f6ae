"""Request and response bodies of the HTTP service (pydantic).

Limits that depend on the run or the server settings (history length, k, known item ids and drafts) are checked
by `RecommendService.prepare`, which can name the run's own numbers; this module checks shape and types only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Mode = Literal["list", "beam"]
Decoder = Literal["ar", "sd"]
Verify = Literal["strict", "relaxed"]


class RecommendRequest(BaseModel):
    # a misspelt option ("temprature") must not be silently ignored
    model_config = ConfigDict(extra="forbid")

    history: list[StrictInt | StrictStr] = Field(
        description="the user's items, oldest first, as the dataset's own ids (Recommender.to_dense)")
    k: StrictInt = Field(10, description="how many items to return")
    mode: Mode = "list"
    decoder: Decoder = "ar"
    draft: str | None = Field(None, description="draft for decoder=sd (default: eagle if trained, else the first)")
    verify: Verify | None = Field(None, description="mode=beam, decoder=sd: strict (default; the same items, order "
                                                    "and scores as plain beam search) or relaxed (AtSpeed-R: "
                                                    "sampled, not lossless)")
    draft_beams: StrictInt | None = Field(None, ge=1, description="mode=beam, decoder=sd: drafted nodes per level "
                                                                  "(>= k; default max(2k, 40))")
    gamma: StrictInt | None = Field(None, ge=1, le=16, description="mode=beam, decoder=sd: drafted levels per "
                                                                   "round (default 3)")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0: greedy; > 0: sampling (list mode)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (temperature > 0); random if absent")
    exclude_history: bool = False


class RecommendedItem(BaseModel):
    rank: int
    item: int | str
    title: str | None = None
    score: float | None = None  # beam mode: summed constrained log-probability of the item's tokens


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    mode: Mode
    decoder: Decoder
    draft: str | None = None
    k: int
    temperature: float
    seed: int | None = None  # the seed a sampled list was drawn with (send it back to reproduce the list)
    tau: float | None = None  # decoder=sd: tokens (list) or item levels (beam) committed per target forward
    verify: Verify | None = None  # mode=beam, decoder=sd
    lossless: bool | None = None  # decoder=sd: False only for relaxed verification (not plain beam search's answer)
    fallback: bool | None = None  # mode=beam, decoder=sd, strict: handed to plain beam search (a float near-tie)
    batch_size: int = 1  # requests decoded together in the model call that produced this answer
    latency_ms: float


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    pid: int  # tells replicas apart behind a load balancer (Ray Serve)
    queued: int


class TargetInfo(BaseModel):
    architecture: str
    layers: int
    hidden: int
    params: int


class InfoResponse(BaseModel):
    dataset: str
    items: int
    target: TargetInfo
    drafts: list[str]
    default_draft: str | None
    sid_scheme: dict
    vocab_size: int
    prompt_history: int  # items of the history the model reads (older ones only count for exclude_history)
    max_history: int
    max_k: int
    max_batch: int
    modes: list[str]
    decoders: list[str]
