"""The local stack's lifecycle and the folder source, against real servers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from chatreid.app.stack import LocalStack
from chatreid.config import Settings
from services.ingestor import Ingestor
from services.ingestor.sources import FolderSource

from .conftest import jpeg_bytes

pytestmark = pytest.mark.stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broker_start_is_idempotent_health_checked_and_stoppable(tmp_path: Path):
    settings = Settings()
    settings.stack.data_dir = tmp_path / "stack"
    settings.stack.kafka_port = free_port()
    settings.kafka.bootstrap_servers = f"127.0.0.1:{settings.stack.kafka_port}"
    stack = LocalStack(settings)
    stack.root.mkdir(parents=True)

    stack.start_kafka()
    first = stack.pids()["kafka"]
    stack.start_kafka()  # already healthy: nothing new is spawned
    assert stack.pids()["kafka"] == first
    kafka = next(s for s in stack.status() if s.name == "kafka")
    assert kafka.running and kafka.healthy and kafka.pid == first
    assert (stack.logs / "kafka.log").exists()

    assert "kafka" in stack.down()
    kafka = next(s for s in stack.status() if s.name == "kafka")
    assert not kafka.running and not kafka.healthy


def test_folder_source_publishes_each_file_once_and_dead_letters_bad_ones(settings, tmp_path):
    from .test_pipeline import read_dead_letters

    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    (tmp_path / "c1" / "a.jpg").write_bytes(jpeg_bytes(color=(10, 200, 10)))
    (tmp_path / "c2" / "b.jpg").write_bytes(jpeg_bytes(color=(10, 10, 200)))
    (tmp_path / "c2" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "0007_c3s1_000151_01.jpg").write_bytes(jpeg_bytes(mode="L"))

    def run() -> tuple[list, Ingestor]:
        ingestor = Ingestor(settings, source="folder")
        results = [result for _, result in FolderSource(tmp_path).publish(ingestor)]
        ingestor.close()
        return results, ingestor

    results, ingestor = run()
    assert ingestor.published == 3 and ingestor.rejected == 1
    events = {r.event.camera: r.event for r in results if r.ok}
    assert set(events) == {"c1", "c2", "c3"}
    assert events["c3"].modality == "infrared"  # single-channel crop
    assert [d.origin for d in read_dead_letters(settings, expect=1)] == ["c2/broken.jpg"]

    again, ingestor = run()  # a restart does not republish what was already durable
    assert again == [] and ingestor.published == 0
