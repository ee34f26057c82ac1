"""HTTP upload endpoint for crops (FastAPI). Bad uploads get a clear 4xx and a dead letter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse

from chatreid.config import Settings
from chatreid.schemas import CropEvent, ErrorResponse

from .service import CropInput, Ingestor

_STATUS = {"image.too_large": 413, "image.bomb": 413}


def create_app(settings: Settings, ingestor: Ingestor | None = None) -> FastAPI:
    app = FastAPI(title="ChatReID crop ingestor", version="1")
    state: dict[str, Ingestor] = {}

    def get_ingestor() -> Ingestor:
        if "ingestor" not in state:  # created lazily: Kafka clients must live in this process
            state["ingestor"] = ingestor or Ingestor(settings, source="http")
        return state["ingestor"]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/crops", status_code=201, response_model=CropEvent,
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}})
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
        crop = CropInput(
            data=data, camera=camera, capture_time=capture_time or datetime.now(UTC),
            modality=modality, track_id=track_id, detection_id=detection_id,
            bbox=_parse_bbox(bbox), origin=f"http:{file.filename}",
        )
        ing = get_ingestor()
        result = ing.submit(crop)
        if not result.ok:
            body = ErrorResponse(error=result.error or "error", detail=result.reason or "")
            return JSONResponse(body.model_dump(), status_code=_STATUS.get(result.error, 400))
        ing.flush()  # the 201 promises the event is on the broker
        return result.event

    return app


def _parse_bbox(raw: str | None) -> tuple[int, int, int, int] | None:
    if not raw:
        return None
    try:
        x, y, w, h = (int(v) for v in raw.split(","))
    except ValueError as exc:
        raise HTTPException(422, "bbox must be four integers x,y,w,h") from exc
    return x, y, w, h
