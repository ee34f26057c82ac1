"""Crop sources: a watched folder and the synthetic live site (HTTP upload lives in ``http``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from chatreid.storage import StoreUnavailable
from services.ingestor.service import CropInput, Ingestor, IngestResult

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class FolderSource:
    """Crops from a folder: ``ROOT/<camera>/<file>``, or files at the top level whose camera is
    read from a Market-1501-style name (``0001_c3s1_000151_01.jpg`` -> ``c3``). Capture time is
    the file's modification time. Files already published are remembered in a state file, so a
    restarted ``--watch`` does not republish (a republish would still be deduplicated by crop id).
    """

    def __init__(self, root: Path, state_file: Path | None = None, poll_s: float = 1.0,
                 check_log_s: float = 10.0) -> None:
        self.root = root
        self.state_file = state_file or root / ".chatreid-ingested.json"
        self.acked_file = self.state_file.with_suffix(".acked.json")
        self.poll_s = poll_s
        self.check_log_s = check_log_s  # how often --watch checks the broker kept our events
        self.done: set[str] = self._load_state()

    def _load_state(self) -> set[str]:
        try:
            return set(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return set()

    def mark_done(self, paths: list[str], acked: dict[int, tuple[int, str]] | None = None) -> None:
        """Call after the crops are durable (producer flushed); ``acked``: the ingestor's
        newest acknowledged record per partition, kept so that a restarted source can still
        tell whether the broker lost them (``Ingestor.log_lost``)."""
        self.done.update(paths)
        _write_json(self.state_file, sorted(self.done))
        if acked:
            _write_json(self.acked_file, {str(p): list(at) for p, at in acked.items()})

    def load_acked(self) -> dict[int, tuple[int, str]]:
        try:
            raw = json.loads(self.acked_file.read_text())
            return {int(p): (int(at[0]), str(at[1])) for p, at in raw.items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return {}

    def _recover_lost(self, ingestor: Ingestor) -> None:
        """The broker lost crop events it had acknowledged (restarted without its log):
        publish the stored crops the index does not hold again (``Ingestor.recover``)."""
        if ingestor.log_lost():
            log.warning("the broker no longer holds crop events it acknowledged; "
                        "re-publishing what the index does not hold")
            ingestor.recover()
            _write_json(self.acked_file, {str(p): list(at) for p, at in ingestor.acked.items()})

    def pending(self) -> list[Path]:
        files = (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return sorted(p for p in files if p.is_file() and self._key(p) not in self.done)

    def _key(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def camera_of(self, path: Path) -> str:
        rel = path.relative_to(self.root)
        if len(rel.parts) > 1:
            return rel.parts[0]
        stem = path.stem.split("_")
        if len(stem) > 1 and stem[1].startswith("c"):
            return stem[1].split("s")[0]
        return "unknown"

    def read(self, path: Path) -> CropInput:
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        return CropInput(data=path.read_bytes(), camera=self.camera_of(path),
                         capture_time=mtime, origin=self._key(path))

    def publish(self, ingestor: Ingestor, watch: bool = False
                ) -> Iterator[tuple[Path, IngestResult]]:
        """Submit every pending file; a batch is remembered as done only once it is durable.
        With ``watch``, an object store that stays down longer than the ingestor waits leaves
        the batch pending (retried next round; crop ids make a re-publish harmless)."""
        ingestor.acked = ingestor.acked or self.load_acked()
        self._recover_lost(ingestor)
        checked = time.monotonic()
        for batch in self.batches(watch=watch):
            if watch and time.monotonic() - checked >= self.check_log_s:
                checked = time.monotonic()
                try:
                    self._recover_lost(ingestor)
                except Exception:  # broker or store still coming back: the next check retries
                    log.exception("re-publishing lost crop events failed; retrying later")
            if not batch:
                continue
            try:
                results = [(p, ingestor.submit(self.read(p))) for p in batch]
            except StoreUnavailable as exc:
                if not watch:
                    raise
                log.warning("object store unavailable (%s); %d files stay pending", exc,
                            len(batch))
                continue
            ingestor.flush()
            self.mark_done([self._key(p) for p in batch], ingestor.acked)
            yield from results

    def batches(self, watch: bool, batch: int = 64) -> Iterator[list[Path]]:
        """Pending files in batches; with ``watch`` an empty batch after each idle poll, so
        the caller gets control while nothing arrives."""
        while True:
            files = self.pending()
            for i in range(0, len(files), batch):
                yield files[i:i + batch]
            if not watch:
                return
            time.sleep(self.poll_s)
            yield []


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def synth_source(seed: int, limit: int | None, rate_hz: float | None,
                 start_time: float | None = None, skip_s: float = 0.0) -> Iterator[CropInput]:
    """The synthetic live site: cameras emitting crops over time (from ``skip_s`` simulated
    seconds in)."""
    from chatreid.synth import SynthConfig, iter_live_crops

    start = time.time() if start_time is None else start_time
    for crop in iter_live_crops(SynthConfig(seed=seed), start_time=start, rate_hz=rate_hz,
                                limit=limit, skip_s=skip_s):
        yield CropInput(
            data=crop.jpeg, camera=crop.camera, modality=crop.modality,
            capture_time=datetime.fromtimestamp(crop.capture_time, UTC),
            track_id=crop.track_id, bbox=crop.bbox,
            origin=f"synth:{crop.camera}:{crop.track_id}",
            labels={"person_id": str(crop.person_id), "clothes_id": str(crop.clothes_id)},
        )
