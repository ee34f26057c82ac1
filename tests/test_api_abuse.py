"""The retrieval API against abuse and bad input: access control on by default, keys minted
while it was off not honoured, cross-site (CSRF) state changes refused, and bad input answered
with a 4xx in the ErrorResponse shape (never a 500) - times in mixed zones, sessions adding up
past the query limits, absurd purge windows, oversized attributes and bodies, chunked bodies.

Route logic runs on the real routes with FastAPI's TestClient (prefilter and rerank stubbed,
the object store real); the CSRF and body-limit checks also run against the deployed app."""

from __future__ import annotations

import json
import logging
import select
import socket
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from chatreid.access import KeyStore, Unauthenticated, token_hash
from chatreid.client import ApiError
from chatreid.errors import EmptyGallery, UnknownCrop
from chatreid.prefilter.store import VectorMeta
from chatreid.storage import ObjectStore
from schemas import QueryRequest
from schemas.api import MAX_ATTRIBUTES, MAX_TEXT_CHARS
from schemas.console import ApiKeyCreate, SessionTurn

from .conftest import deploy_site, jpeg_bytes, namespace

pytestmark = pytest.mark.stack

BOOTSTRAP = "abuse-bootstrap-key"
PORT = 8014  # apart from test_serve (8011), test_console (8012), test_console_page (8013)
START = 1_795_737_600.0
EVIL = "https://evil.example"
FORM = "application/x-www-form-urlencoded"


# -- the routes in-process --------------------------------------------------------------------
class _Remote:
    """A deployment method stand-in: ``await stub.method.remote(*args)``."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


class _Prefilter:
    def __init__(self) -> None:
        self.asked: list = []  # shortlist payloads, to see what a session derived
        self.uploads: list = []  # the upload bytes each shortlist call got
        self.indexed: dict[str, VectorMeta] = {}  # what lookup finds
        self.shortlist = _Remote(self._shortlist)
        self.lookup = _Remote(self._lookup)
        self.purge = _Remote(lambda cutoff: {"crops_erased": 0, "objects_deleted": 0})
        self.cameras = _Remote(lambda: [])

    def _shortlist(self, payload, upload=None):
        self.asked.append(payload)
        self.uploads.append(upload)
        raise EmptyGallery("stub: nothing indexed")

    def _lookup(self, crop_id):
        if crop_id not in self.indexed:
            raise UnknownCrop(f"crop {crop_id!r} is not in the index")
        return self.indexed[crop_id]


def _app(settings):
    """The ingress's investigator and admin routes on ``settings``, in-process."""
    from services.retrieval.admin_routes import AdminRoutes, OpsRoutes
    from services.retrieval.console_routes import ConsoleRoutes
    from services.retrieval.http import build_api

    class Routes(ConsoleRoutes, AdminRoutes, OpsRoutes):
        def __init__(self) -> None:
            super().__init__(settings)
            self.prefilter = _Prefilter()

    routes = Routes()
    app = build_api(routes, routes.body_limits, routes.origins, not routes.keys.enabled)
    client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    return routes, client


def _auth(key: str = BOOTSTRAP, **more: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **more}


def _error(response) -> tuple[int, str]:
    body = response.json()
    assert set(body) >= {"error", "detail"}, body  # the ErrorResponse shape
    return response.status_code, body["error"]


@pytest.fixture
def api(settings):
    settings.serve.api_key = BOOTSTRAP
    settings.access.cache_s = 0.0
    return _app(settings)


def test_access_control_is_on_by_default(settings) -> None:
    """No bootstrap key configured is no longer "anonymous holds every role"."""
    settings.serve.api_key = None
    assert not settings.access.insecure  # the default
    routes, client = _app(settings)
    assert routes.keys.enabled
    for method, path in (("GET", "/v1/cameras"), ("GET", "/v1/admin/keys"),
                         ("POST", "/v1/admin/retention/purge?days=30")):
        answer = client.request(method, path, headers={"content-type": "application/json"})
        assert _error(answer) == (401, "auth.required"), (method, path)
    with pytest.raises(Unauthenticated):  # an empty bootstrap key matches nothing
        routes.keys.authenticate("Bearer ")


def test_insecure_mode_is_explicit_loud_and_mints_no_keys(settings, caplog) -> None:
    settings.access.insecure = True
    with caplog.at_level(logging.WARNING, logger="chatreid.access"):
        routes, client = _app(settings)
    assert "ACCESS CONTROL IS OFF" in caplog.text
    assert not routes.keys.enabled
    assert client.get("/v1/cameras").json() == []  # anonymous, every role
    answer = client.post("/v1/admin/keys", json={"name": "x", "roles": ["admin"]})
    assert _error(answer) == (409, "access.insecure")
    assert ObjectStore(settings.s3).list(settings.access.key_prefix) == []
    with pytest.raises(Exception, match="access control is off"):
        routes.keys.issue(ApiKeyCreate(name="x", roles=["admin"]), by="bootstrap")
    entries = client.get("/v1/admin/audit?action=key.create").json()
    assert [(e["actor"], e["status"]) for e in entries] == [("anonymous", 409)]
    # where anyone holds every role, the cross-site guard is what stops another site's page
    answer = client.post("/v1/admin/retention/purge?days=0.05", content=b"",
                         headers={"origin": EVIL, "content-type": FORM})
    assert _error(answer) == (403, "request.cross_site")


def test_insecure_mode_answers_only_loopback_host_names(settings) -> None:
    """DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 is its own origin (Origin
    == Host passes the cross-site guard); with access control off its Host is refused."""
    settings.access.insecure = True
    settings.access.allowed_origins = ["https://reid.example.org"]
    _, client = _app(settings)
    rebound = {"host": "evil.example:8000", "origin": "http://evil.example:8000",
               "content-type": "application/json"}
    for method, path in (("GET", "/v1/cameras"), ("POST", "/v1/admin/retention/purge?days=1")):
        answer = client.request(method, path, headers=rebound)
        assert _error(answer) == (403, "request.untrusted_host"), (method, path)
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "reid.example.org"):
        assert client.get("/v1/cameras", headers={"host": host}).status_code == 200, host
    settings.access.insecure = False  # with keys, a rebound page has no key to send
    settings.serve.api_key = BOOTSTRAP
    _, client = _app(settings)
    answer = client.get("/v1/cameras", headers={**_auth(), "host": "reid.internal:8000"})
    assert answer.status_code == 200


def test_keys_minted_while_access_control_was_off_are_refused(settings) -> None:
    """Records older than the mark: refused when ``anonymous`` created them; marked records:
    refused unless issued with access control on."""
    settings.serve.api_key = BOOTSTRAP
    settings.access.cache_s = 0.0
    objects = ObjectStore(settings.s3)
    keys = KeyStore(settings, objects)
    good = keys.issue(ApiKeyCreate(name="kept", roles=["admin"]), by="bootstrap")
    assert keys.authenticate(f"Bearer {good.secret}").key_id == good.key_id
    stored = json.loads(objects.get(f"{settings.access.key_prefix}/{good.key_id}.json"))
    assert stored["issued_with_access_control"] is True

    def plant(key_id: str, **record) -> str:
        token = f"crk_{key_id}_secret"
        record = {"key_id": key_id, "name": key_id, "roles": ["admin"], "rate_per_minute": None,
                  "created_at": datetime.now(UTC).isoformat(), "revoked_at": None,
                  "hash": token_hash(token), **record}
        objects.put(f"{settings.access.key_prefix}/{key_id}.json", json.dumps(record).encode())
        return token

    legacy_anonymous = plant("kanon", created_by="anonymous")  # before this change
    legacy_bootstrap = plant("kboot", created_by="bootstrap")
    marked_insecure = plant("kmark", created_by="bootstrap", issued_with_access_control=False)
    for token in (legacy_anonymous, marked_insecure):
        with pytest.raises(Unauthenticated) as refused:
            keys.authenticate(f"Bearer {token}")
        assert refused.value.code == "auth.untrusted"
    assert keys.authenticate(f"Bearer {legacy_bootstrap}").key_id == "kboot"
    keys.revoke("kmark", by="bootstrap")  # revoking keeps the mark
    stored = json.loads(objects.get(f"{settings.access.key_prefix}/kmark.json"))
    assert stored["issued_with_access_control"] is False
    assert {k.key_id for k in keys.list()} == {good.key_id, "kanon", "kboot", "kmark"}
    _, client = _app(settings)
    answer = client.get("/v1/cameras", headers=_auth(legacy_anonymous))
    assert _error(answer) == (401, "auth.untrusted")


def test_state_changes_need_json_from_this_site(api) -> None:
    _, client = api
    purge = "/v1/admin/retention/purge?days=30"
    cases = [  # (headers, expected status, expected code)
        ({"origin": EVIL, "content-type": FORM}, 403, "request.cross_site"),
        ({"origin": EVIL, "content-type": "application/json"}, 403, "request.cross_site"),
        ({"referer": f"{EVIL}/page", "content-type": FORM}, 403, "request.cross_site"),
        ({"origin": "null", "content-type": "application/json"}, 403, "request.cross_site"),
        ({"origin": "http://localhost.evil.example", "content-type": "application/json"},
         403, "request.cross_site"),
        ({"content-type": FORM}, 415, "request.not_json"),
        ({"content-type": "text/plain"}, 415, "request.not_json"),
        ({"content-type": "multipart/form-data; boundary=x"}, 415, "request.not_json"),
        ({}, 415, "request.not_json"),
        ({"origin": "http://localhost", "content-type": FORM}, 415, "request.not_json"),
    ]
    for headers, status, code in cases:
        answer = client.post(purge, content=b"days=0.0001", headers=_auth(**headers))
        assert _error(answer) == (status, code), headers
    for method in ("DELETE", "PUT", "PATCH"):  # every state-changing method
        answer = client.request(method, "/v1/admin/keys/knone", headers=_auth())
        assert _error(answer) == (415, "request.not_json"), method
    # this site's own page, a client without Origin, and reads from anywhere go through
    same = _auth(**{"origin": "http://localhost", "content-type": "application/json"})
    assert client.post(purge, headers=same).status_code == 200
    assert client.post(purge, headers=_auth(**{"referer": "http://localhost/console/",
                                               "content-type": "application/json"})
                       ).status_code == 200
    assert client.post(purge, headers=_auth(**{"content-type": "application/json"})
                       ).status_code == 200
    assert client.get("/v1/admin/keys", headers=_auth(origin=EVIL)).status_code == 200
    answer = client.delete("/v1/admin/keys/knone", headers=_auth(**{
        "content-type": "application/json; charset=utf-8"}))
    assert _error(answer) == (404, "key.unknown")


def test_configured_origins_are_trusted(settings) -> None:
    settings.serve.api_key = BOOTSTRAP
    settings.serve.public_url = "https://reid.example:443/"
    settings.access.allowed_origins = ["https://console.example:8443"]
    _, client = _app(settings)
    purge = "/v1/admin/retention/purge?days=30"
    for origin, status in (("https://reid.example", 200), ("https://console.example:8443", 200),
                           ("https://console.example", 403), ("http://reid.example", 403),
                           (EVIL, 403)):
        answer = client.post(purge, headers=_auth(**{"origin": origin,
                                                     "content-type": "application/json"}))
        assert answer.status_code == status, origin


@pytest.mark.parametrize("days", ["1e9", "inf", "-inf", "nan", "-1", "0", "0.0001", "36526",
                                  "abc"])
def test_purge_days_is_bounded(api, days) -> None:
    _, client = api
    answer = client.post(f"/v1/admin/retention/purge?days={days}",
                         headers=_auth(**{"content-type": "application/json"}))
    assert _error(answer) == (422, "query.invalid"), answer.json()


def test_purge_inside_the_bounds_runs(api) -> None:
    _, client = api
    for days in ("0.05", "30", "36525"):
        answer = client.post(f"/v1/admin/retention/purge?days={days}",
                             headers=_auth(**{"content-type": "application/json"}))
        assert answer.status_code == 200, answer.json()


def test_audit_windows_mixing_time_zones(api) -> None:
    routes, client = api
    routes.audit_log.record("k1", "analyst", "query", 200)
    now = datetime.now(UTC)
    naive = (now - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    aware = (now + timedelta(hours=1)).isoformat()
    for since, until in ((naive, aware), (aware.replace("+00:00", "Z"), None),
                         ("0001-01-01T00:00:00", "9999-12-31T23:59:59"),
                         (None, "0001-01-02T00:00:00")):
        query = "&".join(f"{k}={v.replace('+', '%2B')}" for k, v in
                         (("since", since), ("until", until)) if v)
        answer = client.get(f"/v1/admin/audit?{query}", headers=_auth())
        assert answer.status_code == 200, (since, until, answer.text)
    both = client.get(f"/v1/admin/audit?since={naive}&until={aware.replace('+', '%2B')}",
                      headers=_auth()).json()
    assert [e["action"] for e in both] == ["query"] + ["audit.export"] * 4
    wide = client.get("/v1/admin/audit?since=2000-01-01T00:00:00", headers=_auth()).json()
    assert next(e["action"] for e in wide) == "query"  # one listing over a long window
    # 10:00+02:00 is 08:00 UTC, before the naive (UTC) 09:00
    answer = client.get("/v1/admin/audit?since=2026-01-01T09:00:00"
                        "&until=2026-01-01T10:00:00%2B02:00", headers=_auth())
    assert _error(answer) == (422, "query.invalid")
    for outside in ("until=9999-12-31T23:00:00-05:00", "since=0001-01-01T00:00:00%2B05:00"):
        answer = client.get(f"/v1/admin/audit?{outside}", headers=_auth())  # not in UTC's range
        assert _error(answer) == (422, "query.invalid")


def _search(client, sid: str, body: dict):
    return client.post(f"/v1/sessions/{sid}/search", json=body, headers=_auth())


def test_session_times_are_normalised_to_utc(api) -> None:
    routes, client = api
    created = client.post("/v1/sessions", json={"filters": {
        "time_from": "2026-01-01T00:00:00", "time_to": "2026-01-01T05:00:00+05:00"}},
        headers=_auth())
    assert created.status_code == 201, created.text
    filters = created.json()["filters"]
    assert filters["time_from"] == filters["time_to"] == "2026-01-01T00:00:00Z"
    sid = created.json()["session_id"]
    answer = _search(client, sid, {"text": "red top", "filters": {
        "time_from": "2026-01-01T00:00:00+01:00", "time_to": "2026-01-02T00:00:00"}})
    assert _error(answer) == (404, "gallery.empty")  # the stub's answer: the query went out
    asked = routes.prefilter.asked[-1].filters
    assert asked.time_from == datetime(2025, 12, 31, 23, tzinfo=UTC)
    assert asked.time_to == datetime(2026, 1, 2, tzinfo=UTC)
    answer = _search(client, sid, {"text": "x", "filters": {
        "time_from": "2026-01-01T01:00:00", "time_to": "2026-01-01T01:30:00+01:00"}})
    assert _error(answer) == (422, "query.invalid")  # from after to, once both are UTC
    answer = client.post("/v1/sessions", json={"filters": {
        "time_from": "0001-01-01T00:00:00+01:00"}}, headers=_auth())
    assert _error(answer) == (422, "query.invalid")


def test_a_session_adding_up_past_the_query_limits_is_refused_unchanged(api) -> None:
    routes, client = api
    sid = client.post("/v1/sessions", json={}, headers=_auth()).json()["session_id"]
    session = routes.sessions.load(sid)
    clue = "t" * (MAX_TEXT_CHARS - 10)
    routes.sessions.append(session, SessionTurn(index=0, at=datetime.now(UTC), actor="bootstrap",
                                                action="search", text=clue))
    attrs = [f"attribute {i}" for i in range(MAX_ATTRIBUTES)]
    routes.sessions.append(session, SessionTurn(index=1, at=datetime.now(UTC), actor="bootstrap",
                                                action="search", attributes=attrs))
    before = client.get(f"/v1/sessions/{sid}", headers=_auth()).json()
    for body in ({"text": "in a red jacket and blue jeans"}, {"attributes": ["one more"]}):
        answer = _search(client, sid, body)
        assert _error(answer) == (422, "session.query_too_long"), answer.json()
        assert "start a new session" in answer.json()["detail"]
    assert client.get(f"/v1/sessions/{sid}", headers=_auth()).json() == before
    assert routes.prefilter.asked == []  # nothing reached the prefilter (or the VLM)
    answer = _search(client, sid, {"attributes": [attrs[0]]})  # a repeat adds nothing
    assert _error(answer) == (404, "gallery.empty")
    answer = _search(client, sid, {"text": "may have changed clothes, now in green"})
    assert _error(answer) == (404, "gallery.empty")  # changed clothes drops the old clues
    assert routes.prefilter.asked[-1].text == "now in green"


def test_attribute_and_text_limits(api) -> None:
    _, client = api
    sid = client.post("/v1/sessions", json={}, headers=_auth()).json()["session_id"]
    for body in ({"attributes": ["x" * 20_000]}, {"attributes": ["x"] * (MAX_ATTRIBUTES + 1)},
                 {"text": "x" * (MAX_TEXT_CHARS + 1)}, {"attributes": [""]}):
        assert _error(_search(client, sid, body)) == (422, "query.invalid")
    for bad in ({"kind": "attribute", "attributes": ["x" * 20_000]},
                {"kind": "text_to_image", "text": "x" * (MAX_TEXT_CHARS + 1)},
                {"crop_id": "c" * 300}, {"crop_id": "a", "filters": {"cameras": ["c" * 200]}}):
        with pytest.raises(ValueError):
            QueryRequest(**bad)


def test_bodies_over_the_limits_are_413(api, settings) -> None:
    _, client = api
    sid = client.post("/v1/sessions", json={}, headers=_auth()).json()["session_id"]
    small = settings.access.max_body_bytes
    # no image: the small limit, though the route may take an upload's size
    padded = b'{"text": "red top"' + b" " * (small + 10) + b"}"
    answer = client.post(f"/v1/sessions/{sid}/search", content=padded,
                         headers=_auth(**{"content-type": "application/json"}))
    assert _error(answer) == (413, "request.too_large")

    def chunks(total: int, size: int = 64 * 1024):
        yield b'{"name": "x'
        for _ in range(total // size):
            yield b"x" * size
        yield b'", "roles": ["admin"]}'

    # chunked (no Content-Length): counted as it streams, 413 - not a 400 "parse error"
    answer = client.post("/v1/admin/keys", content=chunks(4 * 1024 * 1024),
                         headers=_auth(**{"content-type": "application/json"}))
    assert _error(answer) == (413, "request.too_large")
    answer = client.post(f"/v1/sessions/{sid}/search", content=chunks(8 * 1024 * 1024),
                         headers=_auth(**{"content-type": "application/json"}))
    assert _error(answer) == (413, "request.too_large")
    answer = client.post("/v1/admin/keys", content=b"{}",
                         headers=_auth(**{"content-type": "application/json",
                                          "content-length": str(small + 1)}))
    assert _error(answer) == (413, "request.too_large")


# -- the deployed app -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(stack_base, ray_session):
    from ray import serve

    from services.ingestor.sources import synth_source

    gen = namespace(stack_base)
    settings = next(gen)
    settings.serve.max_turns = 2
    client, ingested = deploy_site(settings, synth_source(4, 12, None, start_time=START),
                                   port=PORT, api_key=BOOTSTRAP)
    yield settings, client, ingested
    serve.shutdown()
    next(gen, None)


def _raw(settings, method: str, path: str, body: bytes | None = None, **headers: str):
    request = urllib.request.Request(f"{settings.serve.base_url}{path}", data=body,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_deployed_app_refuses_a_cross_site_form_post(site) -> None:
    settings, client, ingested = site
    assert client.health()["access_control"] is True
    path = "/v1/admin/retention/purge?days=0.05"
    status, body = _raw(settings, "POST", path, b"days=0.05", origin=EVIL,
                        authorization=f"Bearer {BOOTSTRAP}", **{"content-type": FORM})
    assert (status, body["error"]) == (403, "request.cross_site")
    status, body = _raw(settings, "POST", path, b"", authorization=f"Bearer {BOOTSTRAP}",
                        **{"content-type": FORM})
    assert (status, body["error"]) == (415, "request.not_json")
    assert client.health()["gallery"] == len(ingested), "nothing was purged"
    # the API's own origin (the console page) and the client library pass
    status, body = _raw(settings, "POST", "/v1/admin/retention/purge?days=36525",
                        origin=f"http://127.0.0.1:{PORT}", authorization=f"Bearer {BOOTSTRAP}",
                        **{"content-type": "application/json"})
    assert status == 200 and body["crops_erased"] == 0
    assert client.call("POST", "/v1/admin/retention/purge?days=36525")["crops_erased"] == 0
    issued = client.call("POST", "/v1/admin/keys", {"name": "temp", "roles": ["investigator"]})
    assert client.call("DELETE", f"/v1/admin/keys/{issued['key_id']}")["revoked_at"]


def test_the_deployed_app_bounds_bodies(site) -> None:
    settings, client, ingested = site
    # a text query is held to the small limit, however it is padded
    small = settings.access.max_body_bytes
    padded = b'{"kind": "text_to_image", "text": "red top"' + b" " * 2_800_000 + b"}"
    status, body = _raw(settings, "POST", "/v1/query", padded,
                        authorization=f"Bearer {BOOTSTRAP}", **{"content-type":
                                                                "application/json"})
    assert (status, body["error"]) == (413, "request.too_large")
    assert str(small) in body["detail"]
    started = time.monotonic()
    with pytest.raises(ApiError) as long_attr:
        client.call("POST", "/v1/query", {"kind": "attribute", "attributes": ["x" * 20_000]})
    assert long_attr.value.status == 422 and time.monotonic() - started < 10
    # zones mixed in the filters: normalised, answered
    event = ingested[0][0]
    answer = client.call("POST", "/v1/query", {
        "crop_id": event.crop_id, "k": 2, "top": 2,
        "filters": {"time_from": "2000-01-01T00:00:00",
                    "time_to": datetime.now(UTC).isoformat()}})
    assert answer["results"]


def _chunked_post(settings, path: str, total: int, content_type: str = "application/json"
                  ) -> tuple[int, dict, int]:
    """POST ``total`` bytes in chunks at up to 25 MB/s (a fast client: 100 MB take 4 s),
    stopping as soon as an answer arrives. Returns the status, the body and how much was
    sent by then."""
    host, port = settings.serve.http_host, settings.serve.http_port
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  f"Authorization: Bearer {BOOTSTRAP}\r\nContent-Type: {content_type}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n").encode())
    piece, sent = b" " * (256 * 1024), 0
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    try:
        while sent < total and not select.select([sock], [], [], 0.01)[0]:
            sock.sendall(chunk)
            sent += len(piece)
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: its answer is waiting
    raw = b""
    sock.settimeout(60)
    while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
        data = sock.recv(65536)
        if not data:
            break
        raw += data
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[: _length(raw)]), sent


def _length(raw: bytes) -> int:
    head = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                 if line.startswith("content-length:")), 1 << 30)


def test_the_deployed_app_refuses_a_chunked_100_mb_body_early(site) -> None:
    settings = site[0]
    total = 100 * 1024 * 1024
    for path in ("/v1/admin/keys", "/v1/query"):
        status, body, sent = _chunked_post(settings, path, total)
        assert (status, body["error"]) == (413, "request.too_large"), (path, body)
        # answered long before the client was done: the app stopped reading at the limit
        # (measured: 0.2 MiB for the 64 KiB limit, 2.8 MiB for a query's upload limit)
        assert sent < total // 4, f"{path}: {sent} bytes went in before the answer"


def test_a_replica_dying_mid_call_is_retried_once_then_503() -> None:
    """A query in flight to a SIGKILLed replica used to be a 500 (ActorDiedError)."""
    import asyncio

    from ray.exceptions import ActorDiedError

    from chatreid.errors import ReplicaUnavailable
    from services.retrieval.http import remote

    def dies(times: int):
        calls = []

        def call():
            calls.append(1)
            if len(calls) <= times:
                raise ActorDiedError()
            return "answer"
        return _Remote(call), calls

    method, calls = dies(1)
    assert asyncio.run(remote(method)) == "answer" and len(calls) == 2  # Serve re-routes it
    method, calls = dies(2)
    with pytest.raises(ReplicaUnavailable) as failed:
        asyncio.run(remote(method))
    assert (failed.value.status, failed.value.code, len(calls)) == (503, "replica.unavailable", 2)


def test_an_unwritable_audit_trail_is_a_503_not_a_500(api) -> None:
    """Nothing is answered without its audit entry: with the store down that is a documented
    503 with Retry-After (it was a 500 after the client's retries)."""
    routes, client = api
    down = routes.settings.s3.model_copy(update={"endpoint": "127.0.0.1:9"})  # nothing there
    routes.audit_log.objects = ObjectStore(down)
    answer = client.post("/v1/admin/retention/purge?days=30",
                         headers=_auth(**{"content-type": "application/json"}))
    assert _error(answer) == (503, "audit.unavailable")
    assert int(answer.headers["retry-after"]) > 0


def test_an_object_store_without_credentials_names_what_to_set(settings) -> None:
    from chatreid.config import MissingCredentials

    with pytest.raises(MissingCredentials, match="CHATREID_S3__ACCESS_KEY"):
        ObjectStore(settings.s3.model_copy(update={"access_key": None, "secret_key": None}))


def test_a_crop_is_a_redirect_to_the_object_store_after_the_access_check(api) -> None:
    """GET /v1/crops/{id}: the crop's bytes come from the object store (a short-lived
    presigned URL), not through the API; unknown crops are 404 and gone ones 410 as before,
    and every view is audited."""
    routes, client = api
    image = jpeg_bytes()
    key = "crops/2026-01-01/c1.jpg"
    routes.objects.put(key, image, "image/jpeg")
    routes.prefilter.indexed["c1"] = VectorMeta(crop_id="c1", camera="cam0", modality="rgb",
                                                capture_time=START, site="s", object_key=key)
    assert _error(client.get("/v1/crops/c1")) == (401, "auth.required")
    answer = client.get("/v1/crops/c1", headers=_auth(), follow_redirects=False)
    assert answer.status_code == 307, answer.text
    url = answer.headers["location"]
    assert url.startswith(f"http://{routes.settings.s3.endpoint}/") and "X-Amz-Signature" in url
    with urllib.request.urlopen(url) as stored:  # no API key: the URL itself grants the read
        assert stored.read() == image and stored.headers["Content-Type"] == "image/jpeg"
    assert _error(client.get("/v1/crops/nope", headers=_auth())) == (404, "crop.unknown")
    routes.objects.delete(key)  # erased or purged since the index was read
    assert _error(client.get("/v1/crops/c1", headers=_auth())) == (410, "crop.gone")
    views = [e for e in routes.audit_log.export(None, None, None, "view")]
    assert [(e.target, e.status) for e in views] == [("c1", 200), ("nope", 404)]


def test_an_upload_is_validated_once_before_any_hop(api) -> None:
    """A search's uploaded image is checked in the ingress (the same limits as ingested
    crops); the prefilter gets its bytes, not the base64 again, and a bad one never leaves."""
    import base64

    routes, client = api
    sid = client.post("/v1/sessions", json={}, headers=_auth()).json()["session_id"]
    bad = base64.b64encode(b"not an image").decode()
    assert _error(_search(client, sid, {"image_b64": bad})) == (422, "image.corrupt")
    assert routes.prefilter.asked == []
    image = jpeg_bytes()
    answer = _search(client, sid, {"image_b64": base64.b64encode(image).decode()})
    assert _error(answer) == (404, "gallery.empty")  # the stub's answer: the query went out
    assert routes.prefilter.uploads == [image]
    assert routes.prefilter.asked[-1].image_b64 is None and routes.prefilter.asked[-1].kind \
        == "standard"
