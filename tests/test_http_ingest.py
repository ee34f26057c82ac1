"""HTTP upload endpoint against the real broker and object store."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from chatreid.storage import ObjectStore
from schemas import ErrorResponse
from services.ingestor.http import create_app

from .conftest import jpeg_bytes
from .test_pipeline import read_dead_letters

pytestmark = pytest.mark.stack
KEY = "http-ingest-bootstrap"  # the bootstrap key holds the ingest role


def ingest_client(settings) -> TestClient:
    settings.serve.api_key = KEY
    return TestClient(create_app(settings), headers={"authorization": f"Bearer {KEY}"})


def test_upload_stores_publishes_and_refuses_bad_crops(settings):
    client = ingest_client(settings)
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
    assert bad_bbox.status_code == 422 and bad_bbox.json()["error"] == "request.invalid"

    letters = read_dead_letters(settings, expect=2)
    assert sorted(d.error for d in letters) == ["image.corrupt", "image.too_large"]
    assert "openapi" in client.get("/openapi.json").json()


@pytest.mark.parametrize(("camera", "capture_time", "error"), [
    ("c\x01\x1b[2J", None, "camera.invalid"),  # control characters (a terminal escape)
    ("x" * 129, None, "camera.invalid"),
    ("../../etc", None, "camera.invalid"),  # path separators
    ("a/b", None, "camera.invalid"),
    ("c1", "9999-12-31T23:59:59Z", "capture_time.invalid"),
    ("c1", "1969-07-20T20:17:00Z", "capture_time.invalid"),
])
def test_bad_metadata_is_a_422_and_a_dead_letter_and_the_stream_carries_on(
        settings, camera, capture_time, error):
    client = ingest_client(settings)
    fields = {"camera": camera, **({"capture_time": capture_time} if capture_time else {})}
    bad = client.post("/v1/crops", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                      data=fields)
    assert bad.status_code == 422, bad.text
    assert ErrorResponse.model_validate(bad.json()).error == error
    ok = client.post("/v1/crops", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                     data={"camera": "c1", "capture_time": "2026-11-27T10:00:00"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["capture_time"].startswith("2026-11-27T10:00:00")  # naive = UTC
    assert ok.json()["capture_time"].endswith("Z")
    assert [d.error for d in read_dead_letters(settings, expect=1)] == [error]


def test_unparseable_fields_are_422_in_the_error_shape(settings):
    client = ingest_client(settings)
    for data in ({"camera": "c1", "capture_time": "+10000-01-01T00:00:00"},  # year 10000
                 {}):  # no camera
        bad = client.post("/v1/crops", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                          data=data)
        assert bad.status_code == 422, bad.text
        assert ErrorResponse.model_validate(bad.json()).error == "request.invalid"


def test_store_or_broker_outage_is_a_503_with_retry_after_and_recovers(settings):
    """StoreUnavailable / KafkaError from submit or flush: 503 in the error shape, then 201."""
    from kafka.errors import KafkaTimeoutError

    from chatreid.storage import StoreUnavailable
    from services.ingestor.service import Ingestor

    real = Ingestor(settings, source="http",
                    store_wait_s=settings.ingestor.http_store_wait_s)
    faults = [StoreUnavailable("object store down"), KafkaTimeoutError("broker down")]

    class Flaky:
        def submit(self, crop):
            if faults and isinstance(faults[0], StoreUnavailable):
                raise faults.pop(0)
            return real.submit(crop)

        def flush(self):
            if faults:
                raise faults.pop(0)
            real.flush()

    settings.serve.api_key = KEY
    client = TestClient(create_app(settings, ingestor=Flaky()),
                        headers={"authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)
    files = {"file": ("a.jpg", jpeg_bytes(color=(10, 200, 77)), "image/jpeg")}
    for code in ("storage.unavailable", "broker.unavailable"):
        r = client.post("/v1/crops", data={"camera": "cam-503"}, files=files)
        assert r.status_code == 503, r.text
        assert ErrorResponse.model_validate(r.json()).error == code
        assert int(r.headers["retry-after"]) > 0
    r = client.post("/v1/crops", data={"camera": "cam-503"}, files=files)
    assert r.status_code == 201, r.text
    assert settings.ingestor.http_store_wait_s == 5
