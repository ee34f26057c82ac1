"""HTTP upload endpoint for crops (FastAPI). Bad uploads get a clear 4xx and a dead letter.

Every ``/v1`` request needs ``Authorization: Bearer <key>`` of a key with the ``ingest`` role
(or the bootstrap key), checked before a byte of the body is read; bodies over the limit are
refused before they are read too (``chatreid.http_limits``). ``/healthz`` stays open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kafka.errors import KafkaError

from chatreid.access import KeyStore
from chatreid.config import Settings
from chatreid.http_limits import BodyLimit, send_error
from chatreid.storage import ObjectStore, StoreUnavailable
from schemas import CropEvent, ErrorResponse
from services.ingestor.service import CropInput, Ingestor

log = logging.getLogger(__name__)

_STATUS = {"image.too_large": 413, "image.bomb": 413, "camera.invalid": 422,
           "capture_time.invalid": 422, "event.invalid": 422}
FORM_OVERHEAD = 64 * 1024  # multipart framing and the text fields around the image
ROLE = "ingest"


def create_app(settings: Settings, ingestor: Ingestor | None = None,
               keys: KeyStore | None = None) -> FastAPI:
    app = FastAPI(title="ChatReID crop ingestor", version="1",
                  description="Upload person crops. POST /v1/crops needs 'Authorization: "
                  f"Bearer <API key>' of a key with the '{ROLE}' role.")
    state: dict[str, Any] = {}

    def get_ingestor() -> Ingestor:
        if "ingestor" not in state:  # created lazily: Kafka clients must live in this process
            state["ingestor"] = ingestor or Ingestor(
                settings, source="http", store_wait_s=settings.ingestor.http_store_wait_s)
        return state["ingestor"]

    def get_keys() -> KeyStore:
        if "keys" not in state:
            state["keys"] = keys or KeyStore(settings, ObjectStore(settings.s3))
        return state["keys"]

    def limit_for(path: str) -> tuple[int, str]:
        if path.startswith("/v1/crops"):  # read per request: the settings may change
            return settings.ingestor.max_bytes + FORM_OVERHEAD, "image.too_large"
        return settings.access.max_body_bytes, "request.too_large"

    # outermost last: the key is checked first, then the body's size, then the route
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(IngestGate, keys=get_keys)
    # Starlette hints handlers as taking any Exception; this one is registered for its class
    app.add_exception_handler(RequestValidationError, _invalid)  # pyright: ignore[reportArgumentType]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/crops", status_code=201, response_model=CropEvent,
              responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 413, 422, 503)})
    async def upload(
        file: Annotated[UploadFile, File(description="the crop (JPEG, PNG, WEBP, BMP)")],
        camera: Annotated[str, Form()],
        capture_time: Annotated[datetime | None, Form()] = None,
        modality: Annotated[str | None, Form()] = None,
        track_id: Annotated[str | None, Form()] = None,
        detection_id: Annotated[str | None, Form()] = None,
        bbox: Annotated[str | None, Form(description="x,y,w,h")] = None,
    ):
        limit = settings.ingestor.max_bytes
        data = await file.read(limit + 1)  # never read more than the limit allows
        try:
            box = _parse_bbox(bbox)
        except ValueError as exc:
            return _error(422, "request.invalid", str(exc))
        crop = CropInput(
            data=data, camera=camera, capture_time=capture_time or datetime.now(UTC),
            modality=modality, track_id=track_id, detection_id=detection_id,
            bbox=box, origin=f"http:{file.filename}",
        )
        try:
            ing = get_ingestor()
            result = ing.submit(crop)
            if not result.ok:
                return _error(_STATUS.get(result.error or "", 400), result.error or "error",
                              result.reason or "")
            ing.flush()  # the 201 promises the event is on the broker
        except StoreUnavailable as exc:
            log.warning("object store unavailable: %s", exc)
            return _error(503, "storage.unavailable",
                          f"cannot store the crop now ({exc}); retry later", retry_after=5)
        except KafkaError as exc:
            log.warning("broker unavailable: %s", exc)
            return _error(503, "broker.unavailable",
                          f"cannot publish the crop event now ({type(exc).__name__}); "
                          "retry later", retry_after=5)
        return result.event

    return app


class IngestGate:
    """ASGI middleware: a ``/v1`` request needs a key with the ``ingest`` role, checked from
    the headers alone, so an unauthenticated upload is refused before its body is read."""

    def __init__(self, app: Any, keys: Callable[[], KeyStore]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        from chatreid.errors import AccessError

        raw = dict(scope.get("headers") or []).get(b"authorization")
        try:
            caller = await asyncio.to_thread(self.keys().authenticate,
                                             raw.decode("latin-1") if raw else None)
            caller.require(ROLE)
        except AccessError as exc:  # 401 auth.*, 403 auth.forbidden
            return await send_error(send, exc.status, exc.code, exc.detail)
        except Exception as exc:  # the key store unreachable: say so, do not guess
            log.exception("key store unavailable")
            return await send_error(send, 503, "auth.unavailable",
                                    f"cannot check the API key now ({type(exc).__name__})")
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def _error(status: int, code: str, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(mode="json"),
                        status_code=status, headers=headers)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error(422, "request.invalid", detail)


def _parse_bbox(raw: str | None) -> tuple[int, int, int, int] | None:
    if not raw:
        return None
    try:
        x, y, w, h = (int(v) for v in raw.split(","))
    except ValueError as exc:
        raise ValueError("bbox must be four integers x,y,w,h") from exc
    return x, y, w, h
