"""Running the app: one process under uvicorn (`serve_http`), or N replicas under Ray Serve (`serve_ray`)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from padrec import PadrecError
from padrec.serving.service import RecommendService, ServeSettings


def serve_http(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
               log_level: str = "info") -> None:
    import uvicorn

    from padrec.serving.app import create_app

    service = RecommendService.from_run(run_dir, settings)
    info = service.info()
    print(f"padrec serve: run {run_dir} ({info.dataset}, {info.items} items, drafts: {', '.join(info.drafts) or 'none'})"
          f" on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)


def serve_ray(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
              replicas: int = 2) -> None:
    """Deploy `replicas` copies of the app with Ray Serve (its proxy balances the requests) and block until Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise PadrecError('--ray needs Ray Serve: pip install "padrec[ray]" (or "ray[serve]")') from None
    from padrec.run import Run
    from padrec.serving.ray_app import build_application

    if replicas < 1:
        raise PadrecError(f"--replicas must be >= 1, got {replicas}")
    # fail here, with padrec's message, rather than in every replica's constructor (which Ray retries)
    run = Run(run_dir)
    if not run.target_dir.exists():
        raise PadrecError(f"run {run.path} has no trained target yet; run `padrec train-target --run {run.path}`")

    def _stop(signum, frame):
        raise KeyboardInterrupt

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(run_dir, settings, replicas), name="padrec", route_prefix="/", blocking=False)
        print(f"padrec serve: {replicas} Ray Serve replicas of run {run_dir} on http://{host}:{port} (Ctrl-C stops)",
              flush=True)
        # a container or supervisor stops us with SIGTERM; shut Ray down as cleanly as on Ctrl-C
        signal.signal(signal.SIGTERM, _stop)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("padrec serve: stopping the Ray Serve application", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
