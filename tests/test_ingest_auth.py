"""The HTTP ingest endpoint: its own role, and body limits checked before the body is read
(declared by Content-Length, and counted as a chunked body streams)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from chatreid.access import Caller, KeyStore, Unauthenticated
from chatreid.config import Settings
from chatreid.storage import ObjectStore
from schemas import ErrorResponse
from schemas.console import ApiKeyCreate
from services.ingestor.http import create_app

from .conftest import jpeg_bytes

BOOTSTRAP = "ingest-bootstrap-key"
MB = 1024 * 1024


class OneKey:
    """A key store holding one token with the ``ingest`` role (no object store needed)."""

    def authenticate(self, authorization: str | None) -> Caller:
        if authorization != "Bearer uploader":
            raise Unauthenticated("send 'Authorization: Bearer <API key>'")
        return Caller("k1", "uploader", frozenset({"ingest"}), 600)


class NoIngestor:
    def submit(self, crop):  # pragma: no cover - a refused request never gets here
        raise AssertionError("the route ran for a refused request")


def asgi_post(app, headers: dict[str, str], chunks: Iterator[bytes]
              ) -> tuple[int, dict, int]:
    """POST /v1/crops straight through ASGI; returns (status, JSON body, body bytes the app
    pulled from the client) - what a server would have had to read."""
    consumed = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal consumed
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/crops", "raw_path": b"/v1/crops",
             "root_path": "", "query_string": b"", "server": ("testserver", 80),
             "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], ErrorResponse.model_validate_json(body).model_dump(), consumed


def multipart_stream(total: int, boundary: str = "xyz") -> Iterator[bytes]:
    """A multipart upload whose file part is ``total`` bytes, produced lazily in 1 MiB chunks."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"camera\"\r\n\r\nc1\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\""
           "\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    for _ in range(total // MB):
        yield b"\xff" * MB
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.fixture
def app():
    return create_app(Settings(), ingestor=NoIngestor(), keys=OneKey())


def test_a_50_mb_upload_is_refused_by_its_content_length_before_reading(app) -> None:
    status, body, consumed = asgi_post(app, {
        "authorization": "Bearer uploader", "content-length": str(50 * MB),
        "content-type": "multipart/form-data; boundary=xyz"}, multipart_stream(50 * MB))
    assert status == 413 and body["error"] == "image.too_large"
    assert consumed == 0, "the body was read before the 413"


def test_a_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(app) -> None:
    limit = Settings().ingestor.max_bytes
    status, body, consumed = asgi_post(app, {
        "authorization": "Bearer uploader", "transfer-encoding": "chunked",
        "content-type": "multipart/form-data; boundary=xyz"}, multipart_stream(100 * MB))
    assert status == 413 and body["error"] == "image.too_large", body
    assert consumed <= limit + 2 * MB, f"read {consumed} bytes of a 100 MB body"


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(app) -> None:
    for headers, code in (({}, 401), ({"authorization": "Bearer nope"}, 401)):
        status, body, consumed = asgi_post(app, {
            **headers, "content-length": str(50 * MB),
            "content-type": "multipart/form-data; boundary=xyz"}, multipart_stream(50 * MB))
        assert (status, body["error"], consumed) == (code, "auth.required", 0)


def test_a_bad_content_length_is_a_400_in_the_error_shape(app) -> None:
    status, body, _ = asgi_post(app, {"authorization": "Bearer uploader",
                                      "content-length": "lots"}, iter(()))
    assert (status, body["error"]) == (400, "request.invalid")


@pytest.mark.stack
def test_the_ingest_endpoint_needs_a_key_with_the_ingest_role(settings) -> None:
    settings.serve.api_key = BOOTSTRAP
    keys = KeyStore(settings, ObjectStore(settings.s3))
    issued = {role: keys.issue(ApiKeyCreate(name=f"{role} key", roles=[role]), by="bootstrap")
              .secret for role in ("ingest", "investigator", "admin")}
    client = TestClient(create_app(settings))
    assert client.get("/healthz").json() == {"status": "ok"}  # open

    def post(token: str | None, camera: str = "c1"):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return client.post("/v1/crops", headers=headers, data={"camera": camera},
                           files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")})

    missing, wrong = post(None), post("crk_kdeadbeef_nope")
    assert (missing.status_code, missing.json()["error"]) == (401, "auth.required")
    assert wrong.status_code == 401 and wrong.json()["error"].startswith("auth.")
    for role in ("investigator", "admin"):  # no other role implies ingest
        refused = post(issued[role])
        assert (refused.status_code, refused.json()["error"]) == (403, "auth.forbidden")
        ErrorResponse.model_validate(refused.json())
    assert post(issued["ingest"]).status_code == 201
    assert post(BOOTSTRAP, camera="c2").status_code == 201  # the bootstrap key holds every role
