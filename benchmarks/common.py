"""What every benchmark writes: a header (name, time, machine, data, args) and the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from tqdm import tqdm

from chatreid.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The research-only data and weights (never in the project): ``SHARED_DATA_DIR``, else
    ``shared/`` beside this checkout (where CI has it; ``.ci/run`` sets the variable for a clone
    made elsewhere)."""
    return Path(os.environ.get("SHARED_DATA_DIR") or ROOT.parent / "shared")


def header(name: str, doc: str, args: argparse.Namespace, **machine: Any) -> dict[str, Any]:
    """``doc`` is the script's docstring; its "Data: ..." paragraph describes the inputs."""
    return {
        "benchmark": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    **machine},
        "data": doc.split("Data: ")[1].split("\n\n")[0].replace("\n", " "),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write(out: Path, report: dict[str, Any], console: Console) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


def namespace() -> Settings:
    """Settings of a fresh namespace of the local stack (topics, bucket, consumer group and
    snapshot prefix of their own), so a run never reads or disturbs another's data."""
    s = Settings()
    tag = uuid.uuid4().hex[:8]
    s.kafka.topic_prefix, s.s3.bucket = f"bench{tag}", f"bench{tag}"
    s.embedder.group_id, s.index.snapshot_prefix = f"bench{tag}", f"snap-bench{tag}"
    return s


def build_site(settings: Settings, n: int, console: Console) -> list[tuple[Any, bytes]]:
    """Stream ``n`` synthetic crops through the real ingestor and embedding service into
    ``settings``' namespace: (CropEvent, crop bytes) of every crop the ingestor accepted."""
    from chatreid.app.stack import LocalStack
    from chatreid.bus import ensure_topics
    from chatreid.storage import ObjectStore
    from services.embedder import EmbedderService
    from services.ingestor import Ingestor
    from services.ingestor.sources import synth_source

    LocalStack(settings).up(ray=False)
    ObjectStore(settings.s3).ensure_bucket()
    ensure_topics(settings.kafka)
    ingestor, events = Ingestor(settings, source="synth"), []
    for crop in tqdm(synth_source(0, n, None, start_time=1_795_737_600.0), total=n,
                     desc="ingest", unit="crop"):
        result = ingestor.submit(crop)
        if result.ok:
            events.append((result.event, crop.data))
    ingestor.close()
    t0 = time.perf_counter()
    stats = EmbedderService(settings).run(until_idle_s=5)
    console.print(f"indexed {stats.indexed} crops in {time.perf_counter() - t0:.0f}s")
    return events
