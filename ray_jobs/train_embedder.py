"""Train the prefilter embedder on Ray Train and publish it (``chatreid train --stage embedder``).

Driver side of :mod:`chatreid.embedder.training`: measure the ImageNet baseline, run the
per-worker loop through :func:`run_trainer` (DDP, resumable, run state in the bucket), take the
final embedder from the last checkpoint and push it with its manifest (stage, parent, data hash,
config, metrics, sha256 of every file) and a ``CheckpointEvent`` - which is what the embedding
service and the search side follow to hot-swap the embedder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chatreid.checkpoints import push
from chatreid.config import Settings
from chatreid.embedder import CHECKPOINT_FILE, build_embedder, embedder_from_checkpoint
from chatreid.embedder.training import (
    HISTORY_FILE,
    EmbedderTrainConfig,
    evaluate_embedder,
    train_embedder_loop,
    train_split_hash,
)
from chatreid.ray_jobs.launcher import run_trainer
from chatreid.schemas import CheckpointEvent

__all__ = ["metrics_table", "run_name", "train_embedder"]

_SCORES = ("rank1", "rank5", "rank10", "mAP")


def run_name(cfg: EmbedderTrainConfig, data_hash: str) -> str:
    """Same config on the same data -> same Ray run, so a re-run resumes instead of restarting."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + data_hash
    return f"embedder-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def train_embedder(
    settings: Settings,
    cfg: EmbedderTrainConfig,
    *,
    parent_version: str | None = None,
    name: str | None = None,
    num_workers: int | None = None,
    console: Console | None = None,
) -> CheckpointEvent:
    """Baseline, train, push; returns the published checkpoint event (metrics included)."""
    console = console or Console()
    with console.status("ImageNet baseline on the query/gallery split"):
        baseline = evaluate_embedder(build_embedder(height=cfg.height, width=cfg.width),
                                     cfg.world_root)
    data_hash = train_split_hash(cfg.world_root)
    name = name or run_name(cfg, data_hash)
    workers = num_workers or settings.train.num_workers
    console.print(f"[bold]embedder[/bold]: Ray Train run {name} on {workers} workers "
                  f"({cfg.epochs} epochs, P={cfg.p} x K={cfg.k}, {cfg.height}x{cfg.width})")
    t0 = time.perf_counter()
    result = run_trainer(settings, train_embedder_loop, {"embedder": cfg.model_dump(mode="json")},
                         name=name, num_workers=workers)
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"embedder training {name} ended without a checkpoint: {result.error}")
    with tempfile.TemporaryDirectory(prefix="embedder-") as tmp:
        ckpt = Path(result.checkpoint.to_directory(str(Path(tmp) / "run")))
        if not (ckpt / CHECKPOINT_FILE).is_file():
            raise RuntimeError(f"{name}: the last checkpoint holds no {CHECKPOINT_FILE}")
        out = Path(tmp) / "push"
        out.mkdir()
        for fname in (CHECKPOINT_FILE, HISTORY_FILE):  # not the optimiser state: serving only
            shutil.copy2(ckpt / fname, out / fname)
        history = json.loads((out / HISTORY_FILE).read_text())
        embedder = embedder_from_checkpoint(out / CHECKPOINT_FILE)
        metrics = _metrics(result.metrics, baseline, history, wall)
        with console.status(f"pushing {embedder.version}"):
            event = push(settings, out, model="embedder", stage="embedder",
                         version=embedder.version, parent_version=parent_version,
                         data_hash=data_hash, config=cfg.model_dump(mode="json"),
                         metrics=metrics)
    console.print(metrics_table(event))
    return event


def _metrics(final: dict, baseline: dict[str, float], history: list[dict[str, float]],
             wall: float) -> dict[str, float]:
    samples = sum(h["samples"] for h in history)
    busy = sum(h["wall_s"] for h in history)
    return {
        **{k: float(final[k]) for k in _SCORES},
        **{f"baseline_{k}": float(baseline[k]) for k in _SCORES},
        "first_loss": float(history[0]["loss"]), "loss": float(history[-1]["loss"]),
        "epochs": float(len(history)), "steps": float(history[-1]["step"]),
        "samples_per_s": samples / busy if busy else 0.0, "job_wall_s": wall,
        "dim": float(final["embedder_dim"]),
    }


def metrics_table(event: CheckpointEvent) -> Table:
    """Before (ImageNet) vs after (trained) on the same query/gallery split."""
    m = event.metrics
    table = Table("embedder", "rank-1", "rank-5", "rank-10", "mAP",
                  title=f"prefilter embedder {event.version}")
    table.add_row("ImageNet MobileNetV2 (baseline)",
                  *(f"{m[f'baseline_{k}']:.3f}" for k in _SCORES))
    table.add_row("trained (ID + triplet, BNNeck)", *(f"{m[k]:.3f}" for k in _SCORES))
    table.caption = (f"loss {m['first_loss']:.3f} -> {m['loss']:.3f} over {m['epochs']:.0f} "
                     f"epochs / {m['steps']:.0f} steps; {m['samples_per_s']:.1f} train samples/s")
    return table
