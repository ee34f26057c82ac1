"""Shared fixtures. Tests marked ``stack`` run against the real local broker and object store
(``.ci/run`` starts them; locally the session fixture starts them with ``chatreid up``). Each
test gets its own topics and bucket, so tests never see each other's data."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from chatreid.config import Settings
from schemas import DEADLETTER, DeadLetterEvent

# The research-only real data and weights (never in the project): read where they lie.
SHARED = Path(os.environ.get("SHARED_DATA_DIR")
              or Path(__file__).resolve().parents[2] / "shared")


@pytest.hookimpl(tryfirst=True)  # before fixtures read the files
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.shared("data/cuhk03-pair1", ...)``: the test reads those paths under
    ``SHARED``. CI has them, so there a missing one fails the test (a broken setup must not pass
    as a skip); a checkout elsewhere skips it and names what is missing."""
    parts = [part for marker in item.iter_markers("shared") for part in marker.args]
    missing = [str(SHARED / part) for part in parts if not (SHARED / part).exists()]
    if missing:
        message = f"the shared research files are missing: {', '.join(missing)} " \
                  "(set SHARED_DATA_DIR to the folder that holds data/ and weights/)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def stack_base() -> Settings:
    from chatreid.app.stack import LocalStack

    settings = Settings()
    settings.ray.join_local_head = False  # a developer's running stack is not the tests' Ray
    LocalStack(settings).up(ray=False)  # idempotent: reuses servers already running
    return settings


@pytest.fixture
def settings(stack_base: Settings) -> Iterator[Settings]:
    """Fresh namespace per test: topic prefix, bucket, consumer group, snapshot prefix."""
    yield from namespace(stack_base)


def namespace(stack_base: Settings) -> Iterator[Settings]:
    """Settings with their own topics, bucket, group and snapshots; the bucket is dropped
    afterwards. (Module-scoped fixtures use it directly.)"""
    from chatreid.bus import ensure_topics
    from chatreid.storage import ObjectStore

    tag = uuid.uuid4().hex[:10]
    s = stack_base.model_copy(deep=True)
    s.kafka.topic_prefix = f"t{tag}"
    s.kafka.partitions = 3
    s.s3.bucket = f"t{tag}"
    s.embedder.group_id = f"g{tag}"
    s.embedder.batch_size = 16
    s.embedder.height, s.embedder.width = 128, 64  # fast; the pipeline is what is tested
    s.index.snapshot_prefix = f"snap-{tag}"
    store = ObjectStore(s.s3)
    store.ensure_bucket()
    ensure_topics(s.kafka)
    yield s
    store.drop_bucket()  # each bucket holds server volumes; free them for the next tests


def deploy_site(settings: Settings, crops, *, port: int, api_key: str) -> tuple:
    """Ingest and index ``crops`` (CropInputs), deploy the retrieval app on them with the tiny
    VLM on ``port``, wait until all are searchable. Returns (client, [(event, crop), ...]).
    The caller shuts Serve down (``serve.shutdown()``) when done."""
    from chatreid.client import RetrievalClient
    from chatreid.query import ModelSpec
    from services.embedder import EmbedderService
    from services.ingestor import Ingestor
    from services.retrieval.app import deploy

    settings.serve.http_port = port
    settings.serve.rerank_num_cpus = 0.25
    settings.serve.light_num_cpus = 0.05
    settings.serve.api_key = api_key
    ingestor = Ingestor(settings, source="synth")
    ingested = [(ingestor.submit(crop).event, crop) for crop in crops]
    ingestor.close()
    assert EmbedderService(settings).run(until_idle_s=3).indexed == len(ingested)
    deploy(settings, ModelSpec.of_base("tiny"))
    client = RetrievalClient(settings.serve.base_url, timeout_s=180, api_key=api_key)
    client.wait_ready(gallery=len(ingested), timeout_s=120)
    return client, ingested


def env_for(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for subprocesses (``python -m chatreid``)."""
    return {
        **os.environ,
        "CHATREID_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "CHATREID_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "CHATREID_S3__BUCKET": settings.s3.bucket,
        "CHATREID_EMBEDDER__GROUP_ID": settings.embedder.group_id,
        "CHATREID_EMBEDDER__BATCH_SIZE": str(settings.embedder.batch_size),
        "CHATREID_EMBEDDER__HEIGHT": str(settings.embedder.height),
        "CHATREID_EMBEDDER__WIDTH": str(settings.embedder.width),
        "CHATREID_INDEX__SNAPSHOT_PREFIX": settings.index.snapshot_prefix,
    }


def jpeg_bytes(size=(64, 128), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def ray_session(stack_base: Settings):
    """One Ray for the whole session (ray.init costs ~4 s and ~1 GiB): jobs share it."""
    import ray

    from chatreid.cluster import connect

    connect(stack_base)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory):
    """The tiny synthetic world (read-only; tests that change a world make their own)."""
    from chatreid.synth import SynthConfig, generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, SynthConfig.tiny(), progress=False)
    return root


def read_events(settings, topic, model, expect: int, timeout_s: float = 30) -> list:
    """Events of ``model`` on the test's ``topic``, waiting until ``expect`` arrived or the
    timeout."""
    from chatreid.bus import make_consumer

    consumer = make_consumer(settings.kafka, None, consumer_timeout_ms=2000)
    consumer.subscribe([settings.kafka.topic(topic.name)])
    found, deadline = [], time.monotonic() + timeout_s
    while len(found) < expect and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            found += [model.from_bytes(r.value) for r in records]
    consumer.close()
    return found


def read_dead_letters(settings, expect: int, timeout_s: float = 30) -> list[DeadLetterEvent]:
    """Dead letters on the test's topic, waiting until ``expect`` arrived or the timeout."""
    return read_events(settings, DEADLETTER, DeadLetterEvent, expect, timeout_s)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # as `python benchmarks/<name>.py` runs: its
        sys.path.append(str(path.parent))  # siblings (common.py) import by name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
