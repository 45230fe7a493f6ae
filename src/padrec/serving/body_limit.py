"""A cap on the size of a request body: 413 with a JSON message, before the body is parsed.

A declared Content-Length over the cap is refused before anything is read; a body sent without one (chunked) is
counted as it arrives and refused once it passes the cap, so a client cannot make the server buffer an unbounded
body either way.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse


class BodyLimit:
    """ASGI middleware; `hint` ends the message (what the client or the operator can do)."""

    def __init__(self, app, limit: int, hint: str = ""):
        self.app, self.limit, self.hint = app, limit, hint

    def message(self, size: int, declared: bool) -> str:
        what = f"is {size} bytes" if declared else f"passed {size} bytes"
        return f"the request body {what}, over this server's limit of {self.limit} bytes" + (
            f"; {self.hint}" if self.hint else "")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = JSONResponse(status_code=413, content={"detail": self.message(int(length), True)})
            return await response(scope, receive, send)
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                # raised inside FastAPI's body read, which passes an HTTPException on to the JSON error handler
                raise HTTPException(status_code=413, detail=self.message(read, False))
            return message

        await self.app(scope, counted, send)
