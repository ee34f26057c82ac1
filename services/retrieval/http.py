"""What every route shares: the FastAPI app, error bodies, request size limits, and the gate
(who is calling, may they, are they over their rate) with the audit record each action leaves.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from chatreid.access import Caller, KeyStore, RateLimited, RateLimiter
from chatreid.audit import AuditLog
from chatreid.config import Settings
from chatreid.retrieval import RetrievalError
from chatreid.schemas import ErrorResponse
from chatreid.schemas.console import Role
from chatreid.sessions import SessionStore
from chatreid.storage import ObjectStore

api = FastAPI(
    title="ChatReID retrieval API",
    version="1",
    description="Cross-camera person re-identification: prefilter the gallery with the "
    "embedder, rerank with the fine-tuned VLM's multi-turn best-choice dialogue; "
    "investigation sessions, access control and an audit trail. Every /v1 route needs "
    "'Authorization: Bearer <API key>' and the role it names.",
)

ERRORS = {s: {"model": ErrorResponse} for s in (401, 403, 404, 410, 413, 422, 429, 503)}
UPLOAD_PATHS = ("/v1/query", "/v1/sessions/")  # bodies that may carry an image


def error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(mode="json"),
                        status_code=status, headers=headers)


def cause(exc: BaseException) -> BaseException:
    """The replica's own exception (Ray wraps it in a RayTaskError on the way back)."""
    return getattr(exc, "cause", None) or exc


async def remote(method, *args) -> Any:
    """Call a deployment method; a RetrievalError raised there is re-raised here as itself."""
    try:
        return await method.remote(*args)
    except Exception as exc:
        inner = cause(exc)
        if isinstance(inner, RetrievalError):
            raise inner from None
        raise


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error(422, "query.invalid", detail)


@api.exception_handler(RetrievalError)
async def _failed(_: Request, exc: RetrievalError) -> JSONResponse:
    headers = ({"Retry-After": str(max(1, round(exc.retry_after_s)))}
               if isinstance(exc, RateLimited) else None)
    return error(exc.status, exc.code, exc.detail, headers)


class BodyLimit:
    """Refuse oversized bodies before they are read into memory: by Content-Length, and by
    counting a chunked body as it streams. Limits come from the replica's settings."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        limits = getattr(getattr(scope.get("app"), "state", None), "body_limits", None)
        if scope["type"] != "http" or limits is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = limits[1] if path.startswith(UPLOAD_PATHS) else limits[0]
        headers = dict(scope.get("headers") or [])
        declared = int(headers.get(b"content-length", b"0") or 0)
        if declared > limit:
            return await _too_large(send, limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    response = error(413, "request.too_large", f"request body over {limit} bytes")
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": response.body})


api.add_middleware(BodyLimit)


class Gate:
    """Per replica: keys, rate limits, the audit log and the session store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.objects = ObjectStore(settings.s3)
        self.keys = KeyStore(settings, self.objects)
        self.limiter = RateLimiter()
        self.audit_log = AuditLog(settings, self.objects)
        self.sessions = SessionStore(settings, self.objects)
        upload = settings.ingestor.max_bytes * 4 // 3 + 64 * 1024  # base64 image + fields
        api.state.body_limits = (settings.access.max_body_bytes, upload)

    async def gate(self, request: Request, role: Role | None) -> Caller:
        """Authenticate, check ``role`` (None: any key), apply the rate limit."""
        caller = await asyncio.to_thread(self.keys.authenticate,
                                         request.headers.get("authorization"))
        if role is not None and role not in caller.roles:
            await self.audit(caller, "denied", 403, target=f"{request.method} "
                             f"{request.url.path}", detail=f"needs role {role}")
        if role is not None:
            caller.require(role)
        self.limiter.check(caller)
        return caller

    async def audit(self, caller: Caller, action: str, status: int = 200, **fields) -> None:
        await asyncio.to_thread(self.audit_log.record, caller.key_id, caller.name, action,
                                status, **fields)
