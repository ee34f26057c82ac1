"""Versioned checkpoints in object storage: upload with a manifest, announce, download, verify.

A checkpoint is a local directory (``save_pretrained`` output, an embedder file, ...). Pushing it
writes every file under ``checkpoints/<model>/<version>/``, then ``manifest.json`` (stage,
parent, data hash, config, metrics, sha256 and size of every file) last, so a reader that finds
the manifest finds the files; then a ``CheckpointEvent`` goes to Kafka. Pulling verifies every
sha256 before anything may load it: serving must refuse a corrupted checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatreid.config import Settings
from chatreid.storage import ObjectStore, file_sha256, sha256_hex
from schemas import CHECKPOINTS, CheckpointEvent, CheckpointFile, ForcedRollout
from schemas.events import CheckpointModel, CheckpointStage, utcnow

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or does not match its manifest."""


def describe(directory: Path) -> list[CheckpointFile]:
    """Every file under ``directory`` (sorted, relative paths) with its sha256 and size."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    if not files:
        raise CheckpointError(f"{directory} holds no files")
    return [CheckpointFile(path=p.relative_to(directory).as_posix(), sha256=file_sha256(p),
                           size=p.stat().st_size) for p in files]


def push(settings: Settings, directory: Path, *, model: CheckpointModel, stage: CheckpointStage,
         version: str, parent_version: str | None = None, data_hash: str | None = None,
         config: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
         producer=None) -> CheckpointEvent:
    """Upload ``directory`` with its manifest and publish the checkpoint event."""
    from chatreid.bus import make_producer, publish

    objects = ObjectStore(settings.s3)
    prefix = f"checkpoints/{model}/{version}"
    files = describe(directory)
    for f in files:
        objects.put(f"{prefix}/{f.path}", (directory / f.path).read_bytes())
    manifest = {
        "model": model, "stage": stage, "version": version, "parent_version": parent_version,
        "data_hash": data_hash, "config": config or {}, "metrics": metrics or {},
        "files": [f.model_dump() for f in files], "created_at": utcnow().isoformat(),
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    objects.put(f"{prefix}/{MANIFEST}", raw, "application/json")  # last: it marks completion
    event = CheckpointEvent(
        model=model, stage=stage, version=version, bucket=settings.s3.bucket, prefix=prefix,
        manifest_key=f"{prefix}/{MANIFEST}", manifest_sha256=sha256_hex(raw),
        parent_version=parent_version, files=files, metrics=metrics or {},
        created_at=manifest["created_at"],
    )
    own = producer is None
    producer = producer or make_producer(settings.kafka)
    try:
        publish(producer, settings.kafka.topic(CHECKPOINTS.name), model, event).get(timeout=30)
    finally:
        if own:
            producer.close()
    return event


def pull(settings: Settings, event: CheckpointEvent, directory: Path) -> dict[str, Any]:
    """Download a checkpoint and verify the manifest and every file; returns the manifest."""
    objects = ObjectStore(settings.s3)
    raw = objects.get(event.manifest_key)
    if sha256_hex(raw) != event.manifest_sha256:
        raise CheckpointError(f"{event.manifest_key} does not match the event's sha256")
    manifest = json.loads(raw)
    directory.mkdir(parents=True, exist_ok=True)
    for entry in manifest["files"]:
        f = CheckpointFile.model_validate(entry)
        data = objects.get(f"{event.prefix}/{f.path}")
        if len(data) != f.size or sha256_hex(data) != f.sha256:
            raise CheckpointError(f"{event.version}: {f.path} does not match its manifest")
        target = directory / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (directory / MANIFEST).write_bytes(raw)
    return manifest


def latest(settings: Settings, model: str, stage: str) -> CheckpointEvent | None:
    """The newest complete checkpoint of ``model`` at ``stage`` (None if there is none).

    Read from the manifests in object storage, so it works without the event history.
    """
    found = [e for e in manifests(settings, model) if e.stage == stage]
    return max(found, key=lambda e: e.created_at) if found else None


def find(settings: Settings, model: str, version: str) -> CheckpointEvent | None:
    """The complete checkpoint of ``model`` with this version (None if there is none)."""
    return next((e for e in manifests(settings, model) if e.version == version), None)


def manifests(settings: Settings, model: str) -> list[CheckpointEvent]:
    """Every complete checkpoint of ``model`` in object storage (a manifest is written last,
    so a half-pushed checkpoint has none)."""
    objects = ObjectStore(settings.s3)
    found: list[CheckpointEvent] = []
    for key in objects.list(f"checkpoints/{model}/"):
        if not key.endswith(f"/{MANIFEST}"):
            continue
        raw = objects.get(key)
        m = json.loads(raw)
        if "created_at" not in m:
            continue
        found.append(CheckpointEvent(
            model=m["model"], stage=m["stage"], version=m["version"],
            bucket=settings.s3.bucket, prefix=key.rsplit("/", 1)[0], manifest_key=key,
            manifest_sha256=sha256_hex(raw), parent_version=m.get("parent_version"),
            files=[CheckpointFile.model_validate(f) for f in m["files"]],
            metrics=m.get("metrics", {}), created_at=m["created_at"],
        ))
    return found


def force(settings: Settings, model: str, version: str, *, by: str,
          reason: str) -> CheckpointEvent:
    """Announce a complete checkpoint again with a gate override: the rollout watchers roll it
    even though the gate refuses it (figures still reported). The caller audits it."""
    from chatreid.bus import make_producer, publish

    event = find(settings, model, version)
    if event is None:
        raise LookupError(f"no complete {model} checkpoint {version!r} "
                          f"(chatreid checkpoints --model {model} lists them)")
    forced = event.model_copy(update={"forced": ForcedRollout(by=by, reason=reason)})
    producer = make_producer(settings.kafka)
    try:
        publish(producer, settings.kafka.topic(CHECKPOINTS.name), model, forced).get(timeout=30)
    finally:
        producer.close()
    return forced
