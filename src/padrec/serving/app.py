"""The FastAPI app: `create_app(service)`; the same app runs under uvicorn and, per replica, under Ray Serve.

Errors are JSON `{"detail": "<message>"}` (validation errors add `"errors"`, pydantic's list): 400 for a body that
is not JSON, 415 for a body sent with another content type, 422 for a request that is JSON but wrong (types,
unknown fields, unknown item ids, k out of range, a mode/decoder combination that does not exist), 404 for a draft
the run does not have, 413 for a body over the server's `max_body_bytes`, 503 while shutting down or when a draft on
disk fails to load.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from padrec import PadrecError, __version__
from padrec.serving.batching import ShuttingDown
from padrec.serving.body_limit import BodyLimit
from padrec.serving.schemas import HealthResponse, InfoResponse, RecommendRequest, RecommendResponse
from padrec.serving.service import RecommendService, RequestError

EXAMPLE = '{"history": [<item id>, ...], "k": 10, "mode": "list", "decoder": "ar"}'


def _where(loc) -> str:
    out = ""
    for x in loc:
        if x == "body":
            continue
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out or "request body"


def _validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        msg = bad_json[0].get("ctx", {}).get("error", "")
        return JSONResponse(status_code=400, content={
            "detail": f"the request body is not valid JSON ({msg}); expected an object like {EXAMPLE}"})
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype.lower():
        # FastAPI only parses JSON bodies; a form or text body would otherwise read as "not a dictionary"
        return JSONResponse(status_code=415, content={
            "detail": f"send the body as JSON with 'Content-Type: application/json' (got {ctype!r})"})
    parts: dict[str, str] = {}
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if len(loc) >= 3 and loc[1] == "history" and loc[-1] in ("int", "str"):
            # the two branches of `StrictInt | StrictStr` fail together; say it once
            parts[_where(loc[:-1])] = "an item id must be an integer or a string"
        elif loc == ("body",) and e.get("type") == "missing":
            parts["request body"] = f"missing: send a JSON object like {EXAMPLE}"
        else:
            parts.setdefault(_where(loc), e.get("msg", "invalid"))
    slim = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse(status_code=422, content={"detail": "; ".join(f"{k}: {v}" for k, v in parts.items()),
                                                  "errors": slim})


def create_app(service: RecommendService) -> FastAPI:
    """The app starts the service's model thread on startup and stops it (after the queued requests) on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="padrec", version=__version__, lifespan=lifespan,
                  description="Generative recommendation with semantic IDs (autoregressive and speculative decoding).")
    app.state.service = service
    limits = service.settings
    app.add_middleware(BodyLimit, limit=limits.body_limit,
                       hint=f"a request holds at most {limits.max_history} history items; the operator can raise the "
                            "limit with `padrec serve --max-body-bytes N`")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_response(request, exc)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.exception_handler(PadrecError)
    async def _padrec_error(request: Request, exc: PadrecError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request: Request, exc: ShuttingDown):
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse(pid=os.getpid(), queued=service.queued())

    @app.get("/info", response_model=InfoResponse)
    async def info() -> InfoResponse:
        return service.info()

    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        return await service.recommend(req)

    return app
