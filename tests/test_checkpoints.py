"""Checkpoints round-trip through the real object store and broker, and corruption is refused."""

from __future__ import annotations

import pytest

from chatreid.bus import make_consumer
from chatreid.checkpoints import CheckpointError, pull, push
from chatreid.config import revealed
from chatreid.storage import ObjectStore
from schemas import CHECKPOINTS, CheckpointEvent

pytestmark = pytest.mark.stack


def make_checkpoint(root):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden": 64}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    return root


def test_push_announces_and_pull_verifies_every_file(settings, tmp_path):
    src = make_checkpoint(tmp_path / "src")
    event = push(settings, src, model="vlm", stage="stage1", version="s1-0001",
                 parent_version=None, data_hash="d" * 8, metrics={"loss": 1.5})
    assert [f.path for f in event.files] == ["config.json", "sub/weights.bin"]

    consumer = make_consumer(settings.kafka, None, consumer_timeout_ms=5000)
    consumer.subscribe([settings.kafka.topic(CHECKPOINTS.name)])
    announced = [CheckpointEvent.from_bytes(r.value) for r in consumer]
    consumer.close()
    assert announced == [event]

    manifest = pull(settings, event, tmp_path / "dst")
    assert manifest["stage"] == "stage1" and manifest["metrics"] == {"loss": 1.5}
    assert (tmp_path / "dst" / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 100


def test_a_corrupted_file_or_manifest_is_refused(settings, tmp_path):
    event = push(settings, make_checkpoint(tmp_path / "src"), model="vlm", stage="stage2",
                 version="s2-0001")
    objects = ObjectStore(settings.s3)
    objects.put(f"{event.prefix}/sub/weights.bin", b"tampered")
    with pytest.raises(CheckpointError, match=r"sub/weights\.bin does not match"):
        pull(settings, event, tmp_path / "dst")
    objects.put(event.manifest_key, b"{}")
    with pytest.raises(CheckpointError, match=r"manifest\.json does not match"):
        pull(settings, event, tmp_path / "dst2")


def test_an_empty_directory_is_not_a_checkpoint(settings, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no files"):
        push(settings, tmp_path / "empty", model="vlm", stage="stage3", version="x")


def test_a_version_can_be_pinned_and_latest_follows_the_newest(settings, tmp_path):
    from chatreid.checkpoints import find, latest
    from chatreid.query.vlm import resolve_spec

    old = push(settings, make_checkpoint(tmp_path / "a"), model="vlm", stage="stage3",
               version="s3-old")
    new = push(settings, make_checkpoint(tmp_path / "b"), model="vlm", stage="stage3",
               version="s3-new")
    assert latest(settings, "vlm", "stage3").version == new.version
    assert find(settings, "vlm", "s3-old") == old and find(settings, "vlm", "nope") is None

    pinned = settings.model_copy(deep=True)
    pinned.serve.model = "s3-old"  # an operator's rollback: serve this one, not the newest
    assert resolve_spec(pinned).event == old
    pinned.serve.model = "latest"
    assert resolve_spec(pinned).event == new
    pinned.serve.model = "tiny"
    assert resolve_spec(pinned).source == "base"
    pinned.serve.model = "s3-missing"
    with pytest.raises(ValueError, match="s3-missing"):
        resolve_spec(pinned)


def test_chatreid_checkpoints_lists_versions_newest_first(settings, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from chatreid.app.cli import app

    push(settings, make_checkpoint(tmp_path / "a"), model="vlm", stage="stage3",
         version="s3-first", metrics={"loss": 2.5, "eval/rank1": 0.4, "eval/chance_rank1": 0.2})
    push(settings, make_checkpoint(tmp_path / "b"), model="vlm", stage="stage2",
         version="s2-other")
    push(settings, make_checkpoint(tmp_path / "c"), model="vlm", stage="stage3",
         version="s3-second")
    env = {f"CHATREID_S3__{k.upper()}": str(v) for k, v in revealed(settings.s3).items()
           if v is not None}
    env["COLUMNS"] = "200"  # a wide terminal (rich reads it; the table has 8 columns)
    out = CliRunner().invoke(app, ["checkpoints", "--stage", "stage3"], env=env,
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    assert out.output.index("s3-second") < out.output.index("s3-first")
    assert "s2-other" not in out.output and "0.400 (0.200)" in out.output
