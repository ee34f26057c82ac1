"""What every route shares: the FastAPI app, error bodies, request size limits, and the gate
(who is calling, may they, are they over their rate) with the audit record each action leaves.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Depends, FastAPI, Request
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


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error(422, "query.invalid", detail)


async def _failed(_: Request, exc: RetrievalError) -> JSONResponse:
    headers = ({"Retry-After": str(max(1, round(exc.retry_after_s)))}
               if isinstance(exc, RateLimited) else None)
    return error(exc.status, exc.code, exc.detail, headers)


_OPEN = "open"  # a route anyone may call (health, the console's static files)


def route(method: str, path: str, role: Role | str | None = _OPEN, **options: Any):
    """Mark a method as an HTTP route needing ``role`` (None: any valid key);
    :func:`build_api` registers it bound to its replica. The caller is checked before the
    body is validated and is on ``request.state.caller``."""
    def mark(fn):
        fn.__route__ = (method, path, role, options)
        return fn
    return mark


def build_api(instance: Any, body_limits: tuple[int, int]) -> FastAPI:
    """This replica's FastAPI app: every ``@route`` method of ``instance`` (its class and
    mixins, in definition order), the error handlers and the body limit."""
    app = FastAPI(
        title="ChatReID retrieval API",
        version="1",
        description="Cross-camera person re-identification: prefilter the gallery with the "
        "embedder, rerank with the fine-tuned VLM's multi-turn best-choice dialogue; "
        "investigation sessions, access control and an audit trail. Every /v1 route needs "
        "'Authorization: Bearer <API key>' and the role it names.",
    )
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(RetrievalError, _failed)
    app.add_middleware(BodyLimit, limits=body_limits)
    seen: set[str] = set()
    for klass in reversed(type(instance).__mro__):
        for name, fn in vars(klass).items():
            if hasattr(fn, "__route__") and name not in seen:
                seen.add(name)
                method, path, role, options = fn.__route__
                guard = [] if role == _OPEN else [Depends(_guard(instance, role))]
                app.add_api_route(path, getattr(instance, name), methods=[method],
                                  dependencies=guard, **options)
    return app


def _guard(instance: Gate, role: Role | None):
    async def guard(request: Request) -> None:
        request.state.caller = await instance.gate(request, role)
    return guard


class BodyLimit:
    """Refuse oversized bodies before they are read into memory: by Content-Length, and by
    counting a chunked body as it streams. ``limits``: (any body, a body with an image)."""

    def __init__(self, app, limits: tuple[int, int]) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = self.limits[1] if path.startswith(UPLOAD_PATHS) else self.limits[0]
        headers = dict(scope.get("headers") or [])
        declared = int(headers.get(b"content-length", b"0") or 0)
        if declared > limit:
            return await _too_large(scope, receive, send, limit)
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
            await _too_large(scope, receive, send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(scope, receive, send, limit: int) -> None:
    await error(413, "request.too_large", f"request body over {limit} bytes")(scope, receive,
                                                                              send)


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
        self.body_limits = (settings.access.max_body_bytes, upload)

    async def gate(self, request: Request, role: Role | None) -> Caller:
        """Authenticate, check ``role`` (None: any key), apply the rate limit."""
        caller = await asyncio.to_thread(self.keys.authenticate,
                                         request.headers.get("authorization"))
        if role is not None and role not in caller.roles:
            await self.audit(caller, "denied", 403, target=f"{request.method} "
                             f"{request.url.path}", detail=f"needs role {role}")
            caller.require(role)  # raises Forbidden
        self.limiter.check(caller)
        return caller

    async def audit(self, caller: Caller, action: str, status: int = 200, **fields) -> None:
        await asyncio.to_thread(self.audit_log.record, caller.key_id, caller.name, action,
                                status, **fields)
