"""Ray Serve scale-out: the FastAPI app of `create_app`, unchanged, as the ingress of a deployment with N replicas.

Each replica is a Ray actor process that loads the run and builds its own `RecommendService` (its own model thread
and micro-batching); Ray Serve's HTTP proxy spreads requests over the replicas. Late-bound ingress
(`serve.ingress()` + `__serve_build_asgi_app__`) lets the app be built after the replica's constructor loaded the
model, so the routes are exactly those of the single-process server.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray import serve

from padrec.serving.service import ServeSettings

# the replica processes must see the same data/cache folders as the driver (tests point these at temp dirs)
FORWARDED_ENV = ("PADREC_DATA_DIR", "PADREC_CACHE_DIR", "OMP_NUM_THREADS")


class _Replica:
    def __init__(self, run_dir: str, settings: ServeSettings | None):
        from padrec.serving.service import RecommendService

        self.service = RecommendService.from_run(run_dir, settings)

    def __serve_build_asgi_app__(self):
        from padrec.serving.app import create_app

        return create_app(self.service)


PadrecIngress = serve.ingress()(_Replica)


def build_application(run_dir: str | Path, settings: ServeSettings | None = None, replicas: int = 2,
                      cpus_per_replica: float | None = None):
    """A bound Ray Serve application (pass it to `serve.run`)."""
    settings = settings or ServeSettings()
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    options = {"num_cpus": cpus_per_replica if cpus_per_replica is not None else (settings.threads or 1)}
    if env:
        options["runtime_env"] = {"env_vars": env}
    deployment = serve.deployment(PadrecIngress).options(
        name="padrec", num_replicas=replicas, ray_actor_options=options,
        # room for a full micro-batch plus the next one queueing while it runs
        max_ongoing_requests=max(5, 2 * settings.max_batch),
    )
    return deployment.bind(str(Path(run_dir).resolve()), settings)
