"""Request body limits for ASGI apps, checked before the body is read into memory.

A framework reads a multipart upload whole (spooling it to disk) before a route sees it, and
turns an error raised while it reads into a ``400`` parse error; so the limit lives here, under
the framework: a declared ``Content-Length`` over the limit is refused without reading a byte,
and a chunked body is counted as it streams and refused the moment it passes the limit (the
app's own answer to the aborted read is dropped). Refusals are ``413`` in the API's
``ErrorResponse`` shape. Light on purpose: no torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas import ErrorResponse

# path -> (largest body in bytes, the error code of a refusal)
LimitFor = Callable[[str], tuple[int, str]]


async def send_error(send: Callable, status: int, code: str, detail: str) -> None:
    """Answer with an ``ErrorResponse`` straight on the ASGI channel."""
    body = ErrorResponse(error=code, detail=detail).model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit_for(path)`` with ``413``."""

    def __init__(self, app: Any, limit_for: LimitFor) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, code = self.limit_for(scope.get("path", ""))
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"content-length")
        if raw is not None:
            try:
                declared = int(raw)
            except ValueError:
                declared = -1
            if declared < 0:
                return await send_error(send, 400, "request.invalid",
                                        "Content-Length is not a byte count")
            if declared > limit:
                return await send_error(send, 413, code, _detail(declared, limit))
        seen, over, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, over
            if over:
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return message

        async def guarded(message: dict) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the read we cut short (e.g. a 400 parse error)
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:  # whatever the app made of the cut-short read, the answer is 413
                raise
        if over and not started:
            await send_error(send, 413, code, _detail(seen, limit, streamed=True))


def _detail(size: int, limit: int, streamed: bool = False) -> str:
    if streamed:
        return f"request body over the limit of {limit} bytes (reading stopped at {size})"
    return f"request body of {size} bytes is over the limit of {limit}; nothing was read"
