"""A small HTTP client for the retrieval API - what ``chatreid query``, the demo, the tests and
the benchmarks use (standard library only, so it runs anywhere the CLI does)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from pydantic import BaseModel

from schemas import ErrorResponse, QueryRequest, QueryResponse


class ApiError(RuntimeError):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


class RetrievalClient:
    def __init__(self, base_url: str, timeout_s: float = 300.0,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = api_key

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        # the API takes state changes only as JSON, also those without a body (CSRF guard)
        json_request = body is not None or method.upper() in ("POST", "PUT", "PATCH", "DELETE")
        headers = {"content-type": "application/json"} if json_request else {}
        request = urllib.request.Request(self.base_url + path, data=body, method=method,
                                         headers=headers)
        if self.api_key:  # not sent on where a redirect leads (a crop's presigned URL)
            request.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = ErrorResponse.model_validate_json(raw)
                raise ApiError(exc.code, err.error, err.detail) from None
            except ValueError:
                raise ApiError(exc.code, "http.error", raw.decode(errors="replace")[:500]) from None

    def call(self, method: str, path: str, payload: BaseModel | dict | None = None) -> Any:
        """Any JSON route (sessions, admin, ops): the decoded answer, None for 204."""
        body = None
        if isinstance(payload, BaseModel):
            body = payload.model_dump_json(exclude_none=True).encode()
        elif payload is not None:
            body = json.dumps(payload, default=str).encode()
        raw = self._call(method, path, body)
        return json.loads(raw) if raw else None

    def query(self, request: QueryRequest) -> QueryResponse:
        raw = self._call("POST", "/v1/query", request.model_dump_json(exclude_none=True).encode())
        return QueryResponse.model_validate_json(raw)

    def crop(self, crop_id: str) -> bytes:
        """The crop's image (the API redirects to the object store; followed here)."""
        return self._call("GET", f"/v1/crops/{crop_id}")

    def health(self) -> dict:
        return json.loads(self._call("GET", "/healthz"))

    def wait_ready(self, gallery: int = 0, timeout_s: float = 300.0) -> dict:
        """Until the API answers and at least ``gallery`` crops are searchable."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                health = self.health()
                if health.get("gallery", 0) >= gallery and health.get("model_version"):
                    return health
                last = health
            except (OSError, ApiError) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"the retrieval API at {self.base_url} is not ready: {last}")
