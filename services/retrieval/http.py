"""What every route shares: the FastAPI app, error bodies, request size limits, the guard
against cross-site requests, and the gate (who is calling, may they, are they over their rate)
with the audit record each action leaves.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from minio.error import S3Error
from ray.exceptions import RayActorError
from starlette.datastructures import Headers
from urllib3.exceptions import HTTPError

from chatreid.access import Caller, KeyStore, RateLimited, RateLimiter
from chatreid.audit import AuditLog
from chatreid.config import Settings
from chatreid.errors import AuditUnavailable, ChatReIDError, ReplicaUnavailable
from chatreid.http_limits import BodyLimit
from chatreid.sessions import SessionStore
from chatreid.storage import ObjectStore, transient_error
from schemas import ErrorResponse
from schemas.console import Role

ERRORS = {s: {"model": ErrorResponse}
          for s in (401, 403, 404, 409, 410, 413, 415, 422, 429, 503)}
UPLOAD_ROUTES = re.compile(r"/v1/(?:query|sessions/[^/]+/search)$")  # may carry an image
RETRY_AFTER_503_S = 5  # what a 503 (dependency restarting, store down) asks clients to wait
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(mode="json"),
                        status_code=status, headers=headers)


def cause(exc: BaseException) -> BaseException:
    """The replica's own exception (Ray wraps it in a RayTaskError on the way back)."""
    return getattr(exc, "cause", None) or exc


async def remote(method, *args) -> Any:
    """Call a deployment method; a ChatReIDError raised there is re-raised here as itself.
    A replica that dies mid-call (SIGKILL, OOM, node lost) gets one retry, which Serve routes
    to a live or replacement replica (every method called this way is safe to repeat), then
    ``503 replica.unavailable``."""
    for attempt in (1, 2):
        try:
            return await method.remote(*args)
        except RayActorError as exc:
            if attempt == 2:
                raise ReplicaUnavailable(f"the replica answering died ({type(exc).__name__}) "
                                         "and is being replaced; retry shortly") from None
        except Exception as exc:
            inner = cause(exc)
            if isinstance(inner, ChatReIDError):
                raise inner from None
            raise


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error(422, "query.invalid", detail)


class BodyTooLarge(ChatReIDError):
    status, code = 413, "request.too_large"


async def small_unless_image(request: Request, has_image: bool, limit: int) -> None:
    """Only a body carrying an image may use the upload limit (413 otherwise). Checked once
    the body is parsed - it is already bounded by the upload limit - because a JSON body
    names its image anywhere."""
    if not has_image and len(await request.body()) > limit:
        raise BodyTooLarge(f"request body over {limit} bytes (access.max_body_bytes); only a "
                           "body carrying an image (image_b64) may be larger")


async def _failed(_: Request, exc: ChatReIDError) -> JSONResponse:
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    else:  # a 503 is "not now": say when to come back
        headers = {"Retry-After": str(RETRY_AFTER_503_S)} if exc.status == 503 else None
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


def build_api(instance: Any, body_limits: tuple[int, int],
              origins: frozenset[str] = frozenset(), insecure: bool = False) -> FastAPI:
    """This replica's FastAPI app: every ``@route`` method of ``instance`` (its class and
    mixins, in definition order), the error handlers, the body limit and the cross-site
    guard (``origins``: browser origins trusted besides the request's own Host). With access
    control off (``insecure``) only loopback or trusted Host names are answered."""
    app = FastAPI(
        title="ChatReID retrieval API",
        version="1",
        description="Cross-camera person re-identification: prefilter the gallery with the "
        "embedder, rerank with the fine-tuned VLM's multi-turn best-choice dialogue; "
        "investigation sessions, access control and an audit trail. Every /v1 route needs "
        "'Authorization: Bearer <API key>' and the role it names.",
    )
    # Starlette hints handlers as taking any Exception; each is registered for its own class
    app.add_exception_handler(RequestValidationError, _invalid)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(ChatReIDError, _failed)  # pyright: ignore[reportArgumentType]
    app.add_middleware(BodyLimit, limit_for=_body_limit(body_limits))
    app.add_middleware(SameSiteJson, origins=origins)
    if insecure:
        app.add_middleware(TrustedHostOnly, origins=origins)  # outermost: refused first
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


def _body_limit(limits: tuple[int, int]):
    """Per path: (any body, a route whose body may carry an image) for
    :class:`chatreid.http_limits.BodyLimit`, the one body-limit middleware."""
    def limit_for(path: str) -> tuple[int, str]:
        return limits[bool(UPLOAD_ROUTES.search(path))], "request.too_large"
    return limit_for


class SameSiteJson:
    """The cross-site request guard (CSRF): a state-changing request (POST, PUT, PATCH,
    DELETE) is refused when its ``Origin`` - or, without one, its ``Referer`` - names another
    site than the request's ``Host``, ``serve.public_url`` or ``access.allowed_origins`` (403
    ``request.cross_site``), and unless it declares a JSON body (``Content-Type:
    application/json``, also where the parameters are in the query string; 415
    ``request.not_json``): forms and ``text/plain`` are what another site's page can send
    without the browser asking first. Clients that are not browsers send no Origin and pass."""

    def __init__(self, app, origins: frozenset[str]) -> None:
        self.app = app
        self.origins = frozenset(o for o in map(_origin, origins) if o != "null")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in STATE_CHANGING:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        sender = headers.get("origin")
        if sender is None and headers.get("referer"):
            sender = headers["referer"]
        if sender is not None and not self._trusted(_origin(sender), headers.get("host")):
            return await error(403, "request.cross_site", "state-changing requests from "
                               "another site are refused (Origin/Referer does not match this "
                               "API; see access.allowed_origins)")(scope, receive, send)
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return await error(415, "request.not_json", f"{scope['method']} needs a JSON "
                               "request (Content-Type: application/json), also when the body "
                               "is empty")(scope, receive, send)
        await self.app(scope, receive, send)

    def _trusted(self, origin: str, host: str | None) -> bool:
        own = {_origin(f"{scheme}://{host}") for scheme in ("http", "https")} if host else set()
        return origin != "null" and (origin in own or origin in self.origins)


class TrustedHostOnly:
    """With access control off, a page on any site could rebind its DNS name to 127.0.0.1 and
    call this API as its own origin (Origin == Host, so :class:`SameSiteJson` passes). Only
    loopback names and the hosts of ``serve.public_url`` / ``access.allowed_origins`` are
    answered then (403 ``request.untrusted_host``)."""

    LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]"})

    def __init__(self, app, origins: frozenset[str]) -> None:
        self.app = app
        self.hosts = self.LOOPBACK | {urlsplit(o).hostname or "" for o in map(_origin, origins)}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = urlsplit(_origin(f"http://{Headers(scope=scope).get('host', '')}")).hostname
        if (f"[{host}]" if host and ":" in host else host) not in self.hosts:
            return await error(403, "request.untrusted_host", "access control is off "
                               "(access.insecure): only loopback names and the hosts of "
                               "serve.public_url / access.allowed_origins are answered")(
                                   scope, receive, send)
        await self.app(scope, receive, send)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-cased, the scheme's default port dropped;
    "null" for anything that is not an http(s) URL (an opaque origin matches nothing)."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return "null"
    if scheme not in _DEFAULT_PORTS or not host:
        return "null"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")


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
        public = [settings.serve.public_url] if settings.serve.public_url else []
        self.origins = frozenset([*public, *settings.access.allowed_origins])

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
        """Write the audit entry before the answer leaves; a store that cannot take it makes
        the request a 503 ``audit.unavailable`` (never an unaudited answer, never a 500)."""
        try:
            await asyncio.to_thread(self.audit_log.record, caller.key_id, caller.name, action,
                                    status, **fields)
        except (S3Error, HTTPError, OSError) as exc:  # the store's answers, not our bugs
            if not transient_error(exc):
                raise
            raise AuditUnavailable("the audit trail cannot be written now (object store "
                                   f"unavailable: {type(exc).__name__}); retry shortly") from None
