"""`padrec serve`: an HTTP recommendation service (FastAPI + uvicorn; Ray Serve for several replicas).

Endpoints: `POST /recommend`, `GET /info`, `GET /health` (see `schemas.py` for the bodies).

Concurrency design. A PyTorch model with per-request KV caches must not run two decodes interleaved on shared
state, and on a CPU box two decodes at once only split the same cores. So each process has exactly one model thread
(`batching.ModelWorker`) that executes every model call; the asyncio handlers validate a request on the event loop
(cheap look-ups), queue it, and await its `concurrent.futures.Future` through `asyncio.wrap_future`, so the loop
never blocks on the model and keeps accepting and answering other connections (/health stays instant under load).

Micro-batching (`--max-batch N`, off by default). With N > 1 the model thread takes the oldest queued request
plus every queued request with the same batch key (greedy AR, same mode, k and exclude_history) and decodes them
in one left-padded batch: list mode through `generate_list_batch`, beam mode through `beam_search_items_batch`.
No waiting window: a lone request is never delayed; batches form exactly when there is load. On Beauty (small
target, 1 thread, 8 clients sending greedy AR list requests) it took 13.4 req/s instead of 4.8 (benchmarks/
load_test.py --mix list-ar=1 --max-batch 16); on a mixed list/beam/SD load it gains little, as SD and the
alternating keys leave few requests of one key in the queue. It is off by default because it is
not exact in float32: the batched decoders give the batch-1 lists in exact arithmetic (tests/test_decoding.py runs
them in float64), but a padded batch rounds differently, so where two constrained logits tie to within ~1e-5 the
batched list can differ from the batch-1 one, and the same request then gets a load-dependent answer. On Beauty
(small target) 0 of 600 sampled test users differed, but one history of the load test has a 4.8e-6 logit gap and
flips in every batch. Beam scores differ in the last float32 digits (~1e-5). Sampled requests are never batched
(the batched sampler draws another random stream, so a seed would stop reproducing its list), nor is speculative
decoding (batch-1 by construction).

Scale-out: `padrec serve --ray --replicas N` runs this app as a Ray Serve deployment (`ray_app.py`); each replica
is one process with its own model thread, and Ray's proxy balances.
"""

from padrec.serving.app import create_app
from padrec.serving.service import RecommendService, RequestError, ServeSettings

__all__ = ["RecommendService", "RequestError", "ServeSettings", "create_app"]
