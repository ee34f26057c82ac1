import json
from datetime import UTC, datetime

import pytest

from schemas import (
    CropEvent,
    DeadLetterEvent,
    EventError,
    IndexedEvent,
    QueryRequest,
    SourceOffset,
)
from schemas.export import SCHEMA_DIR, render_all

SHA = "ab" * 32


def crop_event(**over) -> CropEvent:
    base = dict(crop_id="x1", site="s", camera="c1", capture_time=datetime(2026, 1, 1, tzinfo=UTC),
                object_key="crops/ab/x.jpg", sha256=SHA, width=64, height=128)
    return CropEvent(**{**base, **over})


def test_exported_json_schemas_match_the_models():
    """Regenerate with `python -m schemas` when a contract changes on purpose."""
    rendered = render_all()
    on_disk = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    assert on_disk == rendered


def test_every_event_and_payload_carries_a_schema_version():
    for text in render_all().values():
        assert '"schema_version"' in text


def test_crop_event_round_trips_through_bytes():
    event = crop_event(modality="infrared", labels={"person_id": "7"})
    assert CropEvent.from_bytes(event.to_bytes()) == event


def test_unknown_schema_version_and_fields_are_refused_with_the_field_named():
    good = crop_event().to_bytes()
    with pytest.raises(EventError, match="schema_version"):
        CropEvent.from_bytes(good.replace(b'"schema_version":1', b'"schema_version":2'))
    raw = json.loads(good)
    raw["surprise"] = 1
    with pytest.raises(EventError, match="surprise"):
        CropEvent.from_bytes(json.dumps(raw))
    with pytest.raises(EventError, match="sha256"):
        CropEvent.from_bytes(good.replace(SHA.encode(), b"zz"))


def test_garbage_bytes_are_an_event_error():
    with pytest.raises(EventError):
        CropEvent.from_bytes(b"\x00\xffnot json")


def test_indexed_event_vector_round_trip_and_dimension_check():
    import numpy as np

    vec = np.linspace(-1, 1, 8, dtype=np.float32)
    event = IndexedEvent(crop_id="x", vector_id=1, site="s", camera="c1", modality="rgb",
                         capture_time=datetime(2026, 1, 1, tzinfo=UTC), object_key="k",
                         embedder_version="v", dim=8, vector_b64=IndexedEvent.encode_vector(vec),
                         source=SourceOffset(topic="t", partition=0, offset=3))
    assert np.array_equal(IndexedEvent.from_bytes(event.to_bytes()).vector(), vec)
    bad = event.model_copy(update={"dim": 9})
    with pytest.raises(EventError, match="dim=9"):
        bad.vector()


def test_dead_letter_payload_is_truncated_not_dropped():
    wrapped = DeadLetterEvent.wrap_payload(b"x" * 70_000)
    assert wrapped["payload_truncated"] is True
    assert len(wrapped["payload_b64"]) < 70_000 * 4 // 3


def test_query_request_rules():
    QueryRequest(kind="standard", crop_id="abc")
    QueryRequest(kind="attribute", attributes=["blue top", "backpack"])
    with pytest.raises(ValueError, match="needs crop_id or image_b64"):
        QueryRequest(kind="cloth_changing")
    with pytest.raises(ValueError, match="needs text or attributes"):
        QueryRequest(kind="text_to_image")
    with pytest.raises(ValueError, match="time_from is after time_to"):
        QueryRequest(crop_id="a", filters={"time_from": "2026-01-02T00:00:00Z",
                                           "time_to": "2026-01-01T00:00:00Z"})


def test_query_times_are_normalised_to_utc_and_limits_hold():
    from schemas.api import MAX_ATTRIBUTE_CHARS, MAX_ATTRIBUTES, MAX_TEXT_CHARS

    naive_and_aware = QueryRequest(crop_id="a", filters={
        "time_from": "2026-01-01T00:00:00", "time_to": "2026-01-01T05:00:00+05:00"})
    window = naive_and_aware.filters
    assert window.time_from == window.time_to == datetime(2026, 1, 1, tzinfo=UTC)
    assert window.time_from.utcoffset().total_seconds() == 0
    with pytest.raises(ValueError, match="time_from is after time_to"):
        QueryRequest(crop_id="a", filters={"time_from": "2026-01-01T00:00:01",
                                           "time_to": "2026-01-01T05:00:00+05:00"})
    with pytest.raises(ValueError, match="outside the supported range"):
        QueryRequest(crop_id="a", filters={"time_to": "9999-12-31T23:00:00-05:00"})
    QueryRequest(kind="attribute", attributes=["a" * MAX_ATTRIBUTE_CHARS] * MAX_ATTRIBUTES,
                 text="t" * MAX_TEXT_CHARS)
    for bad in ({"attributes": ["a" * (MAX_ATTRIBUTE_CHARS + 1)]},
                {"attributes": ["a"] * (MAX_ATTRIBUTES + 1)},
                {"text": "t" * (MAX_TEXT_CHARS + 1)}):
        with pytest.raises(ValueError):
            QueryRequest(kind="attribute", **{"attributes": ["x"], **bad})
    schema = json.loads(render_all()["QueryRequest.v1.json"])
    assert schema["properties"]["attributes"]["maxItems"] == MAX_ATTRIBUTES
    assert schema["properties"]["attributes"]["items"]["maxLength"] == MAX_ATTRIBUTE_CHARS


def test_one_query_kind_says_what_each_kind_needs():
    """The kind decides image / text once (schemas.QueryKind): the API's validation, the
    rerank prompts and the evaluation read the same answer; older stored names still parse,
    the API takes only today's."""
    from chatreid.evaluation.tasks import SYNTHETIC, TASK_ALIASES
    from chatreid.rerank.prompts import TEMPLATES
    from schemas import QueryKind

    needs = {k.value: (k.has_image, k.has_text) for k in QueryKind}
    assert needs == {"standard": (True, False), "cloth_changing": (True, False),
                     "visible_infrared": (True, False), "text_to_image": (False, True),
                     "attribute": (False, True), "multimodal": (True, True)}
    for kind in QueryKind:
        image = {"crop_id": "a"} if kind.has_image else {}
        text = {"text": "in red"} if kind.has_text else {}
        assert QueryRequest(kind=kind.value, **image, **text).kind is kind
        if kind.has_image:
            with pytest.raises(ValueError, match="needs crop_id or image_b64"):
                QueryRequest(kind=kind.value, **text)
        if kind.has_text:
            with pytest.raises(ValueError, match="needs text or attributes"):
                QueryRequest(kind=kind.value, **image)
    assert set(TEMPLATES) == set(QueryKind)
    assert QueryKind.parse("adaptive") is QueryKind.MULTIMODAL
    with pytest.raises(ValueError):
        QueryRequest(kind="adaptive", crop_id="a", text="in red")
    task = SYNTHETIC[TASK_ALIASES["synth_adaptive"]]
    assert task.kind is QueryKind.MULTIMODAL and task.image_query and task.text_query
    assert QueryRequest(crop_id="a").model_dump(mode="json")["kind"] == "standard"
