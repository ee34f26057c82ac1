"""Sessions, keys and the audit log without the HTTP layer: how turns add up to the next query,
persistence in the real object store, expiry, key issue/revoke, the rate limit, audit export."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from chatreid.access import Caller, KeyStore, RateLimited, RateLimiter, Unauthenticated
from chatreid.audit import AuditLog
from chatreid.errors import BadQuery
from chatreid.sessions import (
    SessionExpired,
    SessionStore,
    UnknownSession,
    changed_clothes,
    derive,
)
from chatreid.storage import ObjectStore
from schemas import QueryFilters
from schemas.console import (
    ROLES,
    ApiKeyCreate,
    SearchTurn,
    SessionCreate,
    SessionTurn,
    Sighting,
)

NOW = datetime.now(UTC) - timedelta(minutes=1)


def _search(i: int, **kw) -> SessionTurn:
    return SessionTurn(index=i, at=NOW, actor="k1", action="search", **kw)


def _verdict(i: int, crop: str, verdict: str) -> SessionTurn:
    sighting = Sighting(crop_id=crop, camera="cam-1", modality="rgb",
                        capture_time=NOW - timedelta(minutes=i), url=f"u/{crop}",
                        confirmed_at=NOW) if verdict == "confirm" else None
    return SessionTurn(index=i, at=NOW, actor="k1", action=verdict, crop_id=crop,
                       sighting=sighting)


@pytest.mark.parametrize(("text", "changed", "rest"), [
    ("may have changed clothes", True, None),
    ("He may have changed clothes, now in a yellow shirt", True, "now in a yellow shirt"),
    ("in a different outfit and a blue coat", True, "and a blue coat"),
    ("cloth-changing", True, None),
    ("a man with a red backpack", False, "a man with a red backpack"),
    (None, False, None),
])
def test_changed_clothes_is_recognised_and_stripped(text, changed, rest) -> None:
    assert changed_clothes(text) == (changed, rest)


def test_turns_add_up_to_the_next_query() -> None:
    turns = [_search(0, text="a man in a red top and black trousers")]
    state = derive(QueryFilters(), turns)
    query = state.query(SearchTurn())
    assert query.kind == "text_to_image" and query.text == turns[0].text and not query.exclude

    turns += [_verdict(1, "a", "confirm"), _verdict(2, "b", "reject"),
              _verdict(3, "c", "confirm")]
    state = derive(QueryFilters(), turns)
    query = state.query(SearchTurn(k=7))
    # the newest confirmed crop is the query image, the other joins as an anchor; the text
    # still applies (image + text: the multimodal query); confirmed and rejected are excluded
    assert (query.kind, query.crop_id, query.anchors) == ("multimodal", "c", ["a"])
    assert set(query.exclude) == {"a", "b", "c"} and query.k == 7

    turns.append(_search(4, text="may have changed clothes", changed_clothes=True))
    state = derive(QueryFilters(), turns)
    assert state.clues == [] and state.changed_clothes
    query = state.query(SearchTurn())
    assert query.kind == "cloth_changing" and query.text is None and query.crop_id == "c"

    turns.append(_search(5, text="now wearing a yellow shirt"))
    assert derive(QueryFilters(), turns).query(SearchTurn()).kind == "multimodal"

    turns.append(_verdict(6, "c", "reject"))  # a confirmed crop rejected later leaves the query
    query = derive(QueryFilters(), turns).query(SearchTurn())
    assert query.crop_id == "a" and "c" in query.exclude


def test_an_explicit_image_and_filters_and_an_empty_session() -> None:
    with pytest.raises(BadQuery) as empty:
        derive(QueryFilters(), []).query(SearchTurn())
    assert empty.value.code == "session.empty_query"
    turns = [_search(0, image="x", filters=QueryFilters(cameras=["cam-2"])),
             _verdict(1, "y", "confirm"), _search(2, image="z")]
    state = derive(QueryFilters(cameras=["cam-1"]), turns)
    query = state.query(SearchTurn())
    assert query.crop_id == "z" and query.anchors == ["y", "x"]  # newest first
    assert query.filters.cameras == ["cam-2"] and query.kind == "standard"
    upload = derive(QueryFilters(), [_search(0, image="upload:abc")])
    with pytest.raises(BadQuery):
        upload.query(SearchTurn())  # the upload's bytes are gone
    assert upload.query(SearchTurn(), upload_b64="aGk=").image_b64 == "aGk="



def test_turns_adding_up_past_the_query_limits_are_refused() -> None:
    from schemas.api import MAX_ATTRIBUTES, MAX_TEXT_CHARS

    clue = "c" * (MAX_TEXT_CHARS // 2)
    turns = [_search(0, text=clue), _search(1, text=clue)]  # "; " joins them: 2 over
    with pytest.raises(BadQuery) as long_text:
        derive(QueryFilters(), turns).query(SearchTurn())
    assert long_text.value.code == "session.query_too_long" and long_text.value.status == 422
    turns.append(_search(2, text="may have changed clothes, now in green", changed_clothes=True))
    assert derive(QueryFilters(), turns).query(SearchTurn()).text == "now in green"
    many = [_search(i, attributes=[f"a{i}", "backpack"]) for i in range(MAX_ATTRIBUTES)]
    with pytest.raises(BadQuery) as too_many:  # 16 + "backpack" once: the repeats add nothing
        derive(QueryFilters(), many).query(SearchTurn())
    assert too_many.value.code == "session.query_too_long"
    assert len(derive(QueryFilters(), many[:-1]).query(SearchTurn()).attributes) == MAX_ATTRIBUTES


@pytest.mark.stack
def test_sessions_persist_in_object_storage_and_expire(settings) -> None:
    store = SessionStore(settings, ObjectStore(settings.s3))
    session = store.create("k1", SessionCreate(title="east gate"))
    store.append(session, _search(0, text="red backpack"))
    store.append(session, _verdict(1, "a", "confirm"))
    upload = store.put_upload(session.session_id, b"jpeg bytes")

    again = SessionStore(settings, ObjectStore(settings.s3)).load(session.session_id, "k1")
    assert [t.action for t in again.turns] == ["search", "confirm"]
    assert again.view(24).confirmed[0].crop_id == "a" and again.title == "east gate"
    assert store.get_upload(session.session_id, upload) == b"jpeg bytes"
    with pytest.raises(UnknownSession):  # another key's session does not exist for you
        store.load(session.session_id, "k2")
    with pytest.raises(UnknownSession):
        store.load("../../access/keys")
    assert [s.session_id for s in store.owned("k1")] == [session.session_id]

    settings.console.idle_hours = 1e-6  # everything is now idle for too long
    short = SessionStore(settings, ObjectStore(settings.s3))
    time.sleep(0.05)
    with pytest.raises(SessionExpired):
        short.load(session.session_id, "k1")
    assert short.purge_expired() == 1
    assert ObjectStore(settings.s3).list(settings.console.prefix) == []


@pytest.mark.stack
def test_keys_are_stored_hashed_and_revocation_takes_effect(settings) -> None:
    settings.serve.api_key = "bootstrap-secret"
    settings.access.cache_s = 0.0
    objects = ObjectStore(settings.s3)
    keys = KeyStore(settings, objects)
    issued = keys.issue(ApiKeyCreate(name="analyst", roles=["investigator"]), by="bootstrap")
    stored = b"".join(objects.get(k) for k in objects.list(settings.access.key_prefix))
    assert issued.secret.encode() not in stored  # only its hash is kept

    caller = keys.authenticate(f"Bearer {issued.secret}")
    assert caller.key_id == issued.key_id and caller.roles == {"investigator"}
    assert keys.authenticate("Bearer bootstrap-secret").roles == set(ROLES)  # every role
    for header in (None, "Basic abc", "Bearer nope", f"Bearer {issued.secret}x",
                   f"Bearer crk_{issued.key_id}_guess"):
        with pytest.raises(Unauthenticated):
            keys.authenticate(header)
    keys.revoke(issued.key_id, by="bootstrap")
    with pytest.raises(Unauthenticated) as revoked:
        keys.authenticate(f"Bearer {issued.secret}")
    assert revoked.value.code == "auth.revoked"
    assert [k.revoked_at is not None for k in keys.list()] == [True]


def test_the_rate_limit_refills_over_time() -> None:
    limiter = RateLimiter()
    caller = Caller("k1", "analyst", frozenset({"investigator"}), rate_per_minute=120)
    for _ in range(120):
        limiter.check(caller)
    with pytest.raises(RateLimited) as limited:
        limiter.check(caller)
    assert 0 < limited.value.retry_after_s <= 0.5
    limiter.check(Caller("k2", "other", frozenset(), 120))  # each key has its own budget
    time.sleep(0.6)
    limiter.check(caller)


@pytest.mark.stack
def test_the_audit_log_exports_in_time_order_and_filters(settings) -> None:
    log = AuditLog(settings, ObjectStore(settings.s3))
    first = log.record("k1", "analyst", "query", 200, query_kind="standard",
                       result_ids=["a", "b"])
    log.record("k2", "admin", "key.create", 201, target="k3")
    log.record("k1", "analyst", "view", 200, target="a")
    entries = list(log.export())
    assert [e.action for e in entries] == ["query", "key.create", "view"]
    assert entries[0] == first
    assert [e.action for e in log.export(actor="k1")] == ["query", "view"]
    assert list(log.export(until=first.at - timedelta(seconds=1))) == []
