"""The retrieval app on Ray Serve, end to end on the local stack with the tiny VLM: ingest a
synthetic site, deploy, ask every query kind over HTTP; clear errors; metrics; and a rolling
redeploy under continuous queries (zero failures; a corrupted checkpoint refused)."""

from __future__ import annotations

import base64
import io
import threading
import time
import urllib.request
from datetime import UTC, datetime

import pytest
from PIL import Image

from chatreid.client import ApiError, RetrievalClient
from schemas import DEPLOYMENTS, DeploymentEvent, QueryRequest
from services.embedder import EmbedderService
from services.ingestor import Ingestor
from services.ingestor.sources import synth_source

from .conftest import deploy_site, jpeg_bytes, namespace, read_events

pytestmark = pytest.mark.stack

START = 1_795_737_600.0  # the synthetic site's clock
PORT = 8011  # away from a developer's running app (8000)
API_KEY = "test-api-key"  # the app under test requires it (serve.api_key)


@pytest.fixture(scope="module")
def site(stack_base, ray_session):
    """A small indexed site and the app deployed on it with the tiny VLM."""
    from ray import serve

    gen = namespace(stack_base)
    settings = next(gen)
    settings.serve.max_turns = 4  # K = 10 leaves candidates the dialogue does not reach
    settings.serve.rationale_tokens = 8
    client, ingested = deploy_site(settings, synth_source(3, 90, None, start_time=START),
                                   port=PORT, api_key=API_KEY)
    crops = {event.crop_id: (event, crop.labels) for event, crop in ingested}
    yield settings, client, crops
    serve.shutdown()
    next(gen, None)  # drop the namespace's bucket


def _pick(crops, modality="rgb"):
    return next(e for e, _ in crops.values() if e.modality == modality)


KINDS = {
    "standard": lambda q: {"crop_id": q.crop_id},
    "cloth_changing": lambda q: {"crop_id": q.crop_id},
    "visible_infrared": lambda q: {"crop_id": q.crop_id},
    "text_to_image": lambda q: {"text": "a person in a red top and dark trousers"},
    "attribute": lambda q: {"attributes": ["blue top", "backpack"]},
    "multimodal": lambda q: {"crop_id": q.crop_id, "text": "now carries a bag"},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_answers_with_the_ranking_contract(kind, site) -> None:
    settings, client, crops = site
    query = _pick(crops)
    cameras = sorted({e.camera for e, _ in crops.values()} - {query.camera})[:3]
    window = (datetime.fromtimestamp(START, UTC),
              datetime.fromtimestamp(max(e.capture_time.timestamp()
                                         for e, _ in crops.values()) - 5, UTC))
    filters = {"cameras": cameras, "time_from": window[0], "time_to": window[1]}
    request = QueryRequest(kind=kind, k=10, top=10, filters=filters, **KINDS[kind](query))
    response = client.query(request)

    assert response.kind == kind and response.model_version == "base:tiny"
    assert not response.prefilter_only and response.vlm_calls > 0
    results = response.results
    assert [r.rank for r in results] == list(range(1, len(results) + 1))
    assert 0 < len(results) <= 10 and response.candidates == len(results)
    reranked = [r for r in results if r.reranked]
    rest = [r for r in results if not r.reranked]
    assert results[: len(reranked)] == reranked, "reranked results come first"
    assert len(reranked) == min(4, len(results))  # max_turns
    confidences = [r.confidence for r in reranked]
    assert confidences == sorted(confidences, reverse=True)
    assert all(r.confidence is None for r in rest)
    assert [r.prefilter_rank for r in rest] == sorted(r.prefilter_rank for r in rest)
    for r in results:  # every result inside the filters
        assert r.camera in cameras and window[0] <= r.capture_time <= window[1]
        assert r.crop_id != query.crop_id
        assert r.url == f"{settings.serve.base_url}/v1/crops/{r.crop_id}"
    if kind == "visible_infrared":  # cross-spectrum unless a modality is asked for
        assert {r.modality for r in results} == {"infrared"}
    scores = [r.prefilter_score for r in sorted(results, key=lambda r: r.prefilter_rank)]
    if KINDS[kind](query).get("crop_id"):
        assert all(s is not None for s in scores)
    else:  # text: the colour matcher's share, best first (newest first among equals)
        assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert [t.chosen for t in response.turns] == [r.crop_id for r in reranked]


def test_uploaded_image_tau_rationale_and_crop_urls(site) -> None:
    settings, client, crops = site
    query = _pick(crops)
    data = client.crop(query.crop_id)
    assert Image.open(io.BytesIO(data)).size == (query.width, query.height)
    request = QueryRequest(image_b64=base64.b64encode(data).decode(), k=6, top=6, tau=0.5,
                           rationale=True)
    response = client.query(request)
    # an upload is not excluded: the crop itself is the best prefilter match
    assert response.results and all(r.prefilter_score >= 0.5 for r in response.results)
    top_by_prefilter = min(response.results, key=lambda r: r.prefilter_rank)
    assert top_by_prefilter.crop_id == query.crop_id
    with_rationale = [r for r in response.results if r.rationale is not None]
    assert len(with_rationale) == min(settings.serve.rationale_top, len(response.results))
    assert with_rationale == response.results[: len(with_rationale)]


def test_errors_are_clear_and_the_app_keeps_answering(site) -> None:
    settings, client, crops = site
    cases = [
        (QueryRequest(crop_id="no-such-crop"), 404, "crop.unknown"),
        (QueryRequest(image_b64=base64.b64encode(b"not an image").decode()), 422,
         "image.corrupt"),
        (QueryRequest(image_b64=base64.b64encode(jpeg_bytes(size=(8, 8))).decode()), 422,
         "image.too_small"),
        (QueryRequest(kind="attribute", attributes=["red top"],
                      filters={"cameras": ["no-such-camera"]}), 404, "gallery.empty"),
    ]
    for request, status, code in cases:
        with pytest.raises(ApiError) as err:
            client.query(request)
        assert (err.value.status, err.value.error) == (status, code), err.value.detail
    big = base64.b64encode(b"\xff" * (settings.ingestor.max_bytes + 10)).decode()
    with pytest.raises(ApiError) as err:
        client.query(QueryRequest(image_b64=big))
    assert (err.value.status, err.value.error) == (413, "image.too_large")
    raw = urllib.request.Request(f"{settings.serve.base_url}/v1/query", data=b'{"kind": "x"}',
                                 headers={"content-type": "application/json",
                                          "authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(raw)
    assert http.value.code == 422 and b"query.invalid" in http.value.read()
    with pytest.raises(ApiError) as err:
        client.crop("no-such-crop")
    assert err.value.status == 404
    # nothing above broke anything: a good query still answers
    assert client.query(QueryRequest(crop_id=_pick(crops).crop_id, k=3)).results


def test_the_api_key_guards_queries_and_crops(site) -> None:
    settings, client, crops = site
    anonymous = RetrievalClient(settings.serve.base_url, timeout_s=60)
    wrong = RetrievalClient(settings.serve.base_url, timeout_s=60, api_key="not-the-key")
    crop_id = _pick(crops).crop_id
    for who, code in ((anonymous, "auth.required"), (wrong, "auth.invalid")):
        with pytest.raises(ApiError) as denied:
            who.query(QueryRequest(crop_id=crop_id, k=4))
        assert (denied.value.status, denied.value.error) == (401, code)
        with pytest.raises(ApiError) as denied:
            who.crop(crop_id)
        assert denied.value.status == 401
    assert anonymous.health()["gallery"] == 90  # probes need no key
    assert client.query(QueryRequest(crop_id=crop_id, k=4)).results


def test_openapi_health_and_prometheus_metrics(site) -> None:
    import json

    import ray

    settings, client, crops = site
    spec = json.loads(urllib.request.urlopen(f"{settings.serve.base_url}/openapi.json").read())
    assert {"/v1/query", "/v1/crops/{crop_id}", "/healthz"} <= set(spec["paths"])
    assert "QueryRequest" in json.dumps(spec["paths"]["/v1/query"])
    health = client.health()
    assert health["gallery"] == 90 and health["model_version"] == "base:tiny"
    # a fresh replica read the whole log once (no snapshot yet): how it came back is visible
    assert health["index_log"]["read"] >= 90 and health["index_log"]["log_resets"] == 0
    client.query(QueryRequest(crop_id=_pick(crops).crop_id, k=4))
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_chatreid_queries", "ray_chatreid_query_latency_ms",
              "ray_chatreid_vlm_calls_per_query", "ray_chatreid_candidates_reranked")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray exports replica metrics every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
    ok = [line for line in text.splitlines()
          if line.startswith("ray_chatreid_queries") and 'outcome="ok"' in line]
    assert ok and sum(float(line.rsplit(" ", 1)[1]) for line in ok) >= 1


# -- rolling redeploy ----------------------------------------------------------------------------
def _push_tiny(settings, tmp_path, version: str, corrupt: bool = False):
    import torch

    from chatreid.checkpoints import push
    from chatreid.model import build_model, save_checkpoint
    from chatreid.storage import ObjectStore

    model, processor = build_model("tiny")
    with torch.no_grad():  # a different model than the base, so the swap is observable
        model.lm_head.weight.mul_(1.5)
    directory = save_checkpoint(model, processor, tmp_path / version)
    if not corrupt:
        return push(settings, directory, model="vlm", stage="stage3", version=version)
    # upload good files, then flip bytes of the weights behind the manifest's back
    event = push(settings, directory, model="vlm", stage="stage3", version=version,
                 producer=_Held())
    key = f"{event.prefix}/model.safetensors"
    objects = ObjectStore(settings.s3)
    data = bytearray(objects.get(key))
    data[-100:] = b"\x00" * 100
    objects.put(key, bytes(data))
    _Held.release(settings, event)
    return event


class _Held:
    """A producer that holds the event back, so the files can be damaged before it is sent."""

    def send(self, *args, **kwargs):
        class _Done:
            def get(self, timeout=None):
                return None
        return _Done()

    @staticmethod
    def release(settings, event) -> None:
        from chatreid.bus import make_producer, publish
        from schemas import CHECKPOINTS

        producer = make_producer(settings.kafka)
        publish(producer, settings.kafka.topic(CHECKPOINTS.name), "vlm", event).get(timeout=30)
        producer.close()


def test_rolling_redeploy_under_continuous_queries(site, tmp_path) -> None:
    from chatreid.query import ModelSpec
    from services.retrieval.app import deploy
    from services.retrieval.vlm_rollout import VLMRollout

    settings, client, crops = site
    settings.gate.enabled = False  # rollout mechanics; the gate: tests/test_gate.py
    settings.serve.rerank_replicas = 2
    settings.serve.fallback_model = None
    deploy(settings, None)  # two replicas, no model yet
    query = QueryRequest(crop_id=_pick(crops).crop_id, k=6, top=6)
    with pytest.raises(ApiError) as err:
        client.query(query)
    assert (err.value.status, err.value.error) == (503, "model.unavailable")
    deploy(settings, ModelSpec.of_base("tiny"))

    answered: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answered.append(client.query(query).model_version or "")
            except Exception as exc:
                failures.append(repr(exc))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        rollout = VLMRollout(settings, ModelSpec.of_base("tiny"))
        v1 = _push_tiny(settings, tmp_path, "tiny-ft-1")
        outcome = rollout.step(timeout_ms=5000)
        assert outcome is not None and outcome.status == "completed", outcome
        assert outcome.version == v1.version and outcome.replicas == 2
        seen_new = time.monotonic() + 60
        while "tiny-ft-1" not in answered[-5:] and time.monotonic() < seen_new:
            time.sleep(0.2)

        bad = _push_tiny(settings, tmp_path, "tiny-ft-2-corrupt", corrupt=True)
        refused = rollout.step(timeout_ms=5000)
        assert refused is not None and refused.status == "refused"
        assert refused.version == bad.version and "does not match" in (refused.reason or "")
        assert rollout.step(timeout_ms=1000) is None  # refused once, not retried forever
        n = len(answered)
        time.sleep(3)
    finally:
        stop.set()
        for w in workers:
            w.join()
        rollout.close()

    assert failures == [], failures[:3]
    assert "base:tiny" in answered and "tiny-ft-1" in answered
    first_new = answered.index("tiny-ft-1")
    assert set(answered[n:]) == {"tiny-ft-1"}, "the old checkpoint keeps serving after a refusal"
    assert "tiny-ft-2-corrupt" not in answered
    assert len(answered) > first_new
    statuses = [(e.status, e.version)
                for e in read_events(settings, DEPLOYMENTS, DeploymentEvent, 3)]
    assert statuses == [("started", "tiny-ft-1"), ("completed", "tiny-ft-1"),
                        ("refused", "tiny-ft-2-corrupt")]


def test_a_rollout_failing_on_a_replica_is_rolled_back(site, tmp_path) -> None:
    """The watcher's side of a failed rollout: the previous model is deployed again and the
    event says why. (Serve itself is exercised above; here the deploy fails on purpose, as when
    a replica runs out of memory loading the new model.)"""
    from chatreid.query import ModelSpec
    from services.retrieval.app import DeployFailed
    from services.retrieval.vlm_rollout import VLMRollout

    settings = site[0]
    settings.gate.enabled = False  # rollout mechanics; the gate: tests/test_gate.py
    deployed: list[str | None] = []

    def deployer(_settings, spec) -> None:
        deployed.append(spec.version if spec else None)
        if len(deployed) == 1:
            raise DeployFailed("Rerank: replica died while loading the model")

    rollout = VLMRollout(settings, ModelSpec.of_base("tiny"), deployer=deployer)
    try:
        _push_tiny(settings, tmp_path, "tiny-ft-3")
        outcome = rollout.step(timeout_ms=5000)
        assert outcome is not None and outcome.status == "rolled_back"
        assert outcome.version == "tiny-ft-3" and outcome.previous_version == "base:tiny"
        assert "replica died" in (outcome.reason or "")
        assert deployed == ["tiny-ft-3", "base:tiny"]  # tried, then the previous one restored
        assert rollout.current == ModelSpec.of_base("tiny")
        assert rollout.step(timeout_ms=1000) is None  # not retried in a loop
    finally:
        rollout.close()


def test_chatreid_query_prints_the_answer_and_writes_a_contact_sheet(site, tmp_path) -> None:
    from typer.testing import CliRunner

    from chatreid.app.cli import app

    settings, _, crops = site
    query = _pick(crops)
    sheet = tmp_path / "answer.png"
    result = CliRunner().invoke(app, [
        "query", "--crop-id", query.crop_id, "--k", "6", "--top", "5",
        "--url", settings.serve.base_url, "--sheet", str(sheet)], terminal_width=200,
        env={"CHATREID_SERVE__API_KEY": API_KEY})  # the CLI presents the configured key
    assert result.exit_code == 0, result.output
    assert "standard query" in result.output and "confidence" in result.output
    assert Image.open(sheet).size[0] > 0
    bad = CliRunner().invoke(app, ["query", "--crop-id", "nope", "--url",
                                   settings.serve.base_url],
                             env={"CHATREID_SERVE__API_KEY": API_KEY})
    assert bad.exit_code == 1 and "crop.unknown" in bad.output


def _painted(upper: str, lower: str) -> bytes:
    """A person-shaped crop in two garment colours (the colour matcher's terms)."""
    from PIL import ImageDraw

    from chatreid.embedder.colour import COLOUR_TERMS

    img = Image.new("RGB", (64, 128), (90, 140, 90))
    draw = ImageDraw.Draw(img)
    draw.rectangle((16, 20, 48, 64), fill=COLOUR_TERMS[upper])
    draw.rectangle((18, 66, 46, 120), fill=COLOUR_TERMS[lower])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_a_text_query_shortlists_the_crops_in_the_named_colours(site) -> None:
    """Last in this file: it adds crops to the site's gallery."""
    from services.ingestor.service import CropInput

    settings, client, _ = site
    outfits = [("green", "black"), ("red", "blue"), ("yellow", "white"), ("red", "black")]
    ingestor = Ingestor(settings, source="test")
    ids = {}
    for i, (upper, lower) in enumerate(outfits):
        crop = CropInput(data=_painted(upper, lower), camera="painted",
                         capture_time=datetime.fromtimestamp(START + 10 * i, UTC))
        ids[ingestor.submit(crop).event.crop_id] = (upper, lower)
    ingestor.close()
    assert EmbedderService(settings).run(until_idle_s=3).indexed == len(outfits)
    client.wait_ready(gallery=90 + len(outfits), timeout_s=60)

    response = client.query(QueryRequest(
        kind="text_to_image", text="A man wearing a red t-shirt and blue jeans.", k=4, top=4,
        filters={"cameras": ["painted"]}))
    by_prefilter = sorted(response.results, key=lambda r: r.prefilter_rank)
    assert ids[by_prefilter[0].crop_id] == ("red", "blue")  # both colours match
    assert ids[by_prefilter[1].crop_id] == ("red", "black")  # one of two
    scores = [r.prefilter_score for r in by_prefilter]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.8 > scores[-1]
    # Multimodal (image + text): the image's cosine shortlist re-ordered with the colour match.
    query_id = next(c for c, look in ids.items() if look == ("green", "black"))
    multimodal = client.query(QueryRequest(
        kind="multimodal", crop_id=query_id, text="now in a yellow shirt and white trousers",
        k=3, top=3, filters={"cameras": ["painted"]}))
    first = min(multimodal.results, key=lambda r: r.prefilter_rank)
    assert ids[first.crop_id] == ("yellow", "white")
    assert query_id not in {r.crop_id for r in multimodal.results}
