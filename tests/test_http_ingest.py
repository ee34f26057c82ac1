"""HTTP upload endpoint against the real broker and object store."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from chatreid.services.ingestor.http import create_app
from chatreid.storage import ObjectStore

from .conftest import jpeg_bytes
from .test_pipeline import read_dead_letters

pytestmark = pytest.mark.stack


def test_upload_stores_publishes_and_refuses_bad_crops(settings):
    client = TestClient(create_app(settings))
    assert client.get("/healthz").json() == {"status": "ok"}

    ok = client.post("/v1/crops", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                     data={"camera": "c3", "bbox": "10,20,64,128",
                           "capture_time": "2026-11-27T10:00:00Z"})
    assert ok.status_code == 201, ok.text
    event = ok.json()
    assert event["camera"] == "c3" and event["modality"] == "rgb"
    assert event["bbox"] == {"x": 10, "y": 20, "w": 64, "h": 128}
    assert ObjectStore(settings.s3).get(event["object_key"]) == jpeg_bytes()

    corrupt = client.post("/v1/crops", files={"file": ("b.jpg", b"garbage", "image/jpeg")},
                          data={"camera": "c3"})
    assert corrupt.status_code == 400
    assert corrupt.json()["error"] == "image.corrupt"

    settings.ingestor.max_bytes = 100
    big = client.post("/v1/crops", files={"file": ("c.jpg", jpeg_bytes(), "image/jpeg")},
                      data={"camera": "c3"})
    assert big.status_code == 413 and "exceeds the limit" in big.json()["detail"]

    bad_bbox = client.post("/v1/crops", files={"file": ("d.jpg", jpeg_bytes(), "image/jpeg")},
                           data={"camera": "c3", "bbox": "1,2"})
    assert bad_bbox.status_code == 422

    letters = read_dead_letters(settings, expect=2)
    assert sorted(d.error for d in letters) == ["image.corrupt", "image.too_large"]
    assert "openapi" in client.get("/openapi.json").json()
