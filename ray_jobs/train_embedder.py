"""Train the prefilter embedder on Ray Train and publish it (``chatreid train --stage embedder``).

Driver side of :mod:`chatreid.tuning.embedder_training`: measure the start (ImageNet, a
checkpoint or an imported ONNX model) on the validation parts, run the per-worker loop through
:func:`run_trainer` (DDP, resumable, run state in the bucket), take the final embedder from the
last checkpoint and push it with its manifest (stage, parent, data hash, config, metrics,
sha256 of every file) and a ``CheckpointEvent`` - which is what the embedding service and the
search side follow to hot-swap the embedder (after the rollout gate).
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
from chatreid.embedder import load_embedder
from chatreid.tuning.embedder_training import (
    HISTORY_FILE,
    STATE_FILE,
    EmbedderTrainConfig,
    evaluate_parts,
    resolve_source,
    train_embedder_loop,
    train_split_hash,
)
from ray_jobs.launcher import run_trainer
from schemas import CheckpointEvent

__all__ = ["metrics_table", "run_name", "train_embedder"]

_SCORES = ("rank1", "rank5", "rank10", "mAP")
_PARTS = ("synthetic", "real")


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
    with (console.status(f"measuring the start ({cfg.start}) on the validation parts"),
          tempfile.TemporaryDirectory(prefix="embedder-start-") as tmp):
        start = (load_embedder(None, height=cfg.height, width=cfg.width)
                 if cfg.start == "imagenet"
                 else resolve_source(settings, cfg.start, cfg.start_card, Path(tmp)))
        baseline = evaluate_parts(start, cfg.world_root, cfg.real_root)
    data_hash = train_split_hash(cfg.world_root, cfg.real_root, cfg.extra_worlds)
    name = name or run_name(cfg, data_hash)
    workers = num_workers or settings.train.num_workers
    console.print(f"[bold]embedder[/bold]: Ray Train run {name} on {workers} workers "
                  f"({cfg.epochs} epochs, P={cfg.p} x K={cfg.k}, start {cfg.start}"
                  + (f", teacher {cfg.teacher}" if cfg.teacher else "") + ")")
    t0 = time.perf_counter()
    result = run_trainer(settings, train_embedder_loop, {"embedder": cfg.model_dump(mode="json")},
                         name=name, num_workers=workers)
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"embedder training {name} ended without a checkpoint: {result.error}")
    with tempfile.TemporaryDirectory(prefix="embedder-") as tmp:
        ckpt = Path(result.checkpoint.to_directory(str(Path(tmp) / "run")))
        out = Path(tmp) / "push"
        out.mkdir()
        for f in ckpt.iterdir():  # the serving files and the history, not the optimiser state
            if f.is_file() and f.name != STATE_FILE:
                shutil.copy2(f, out / f.name)
        history = json.loads((out / HISTORY_FILE).read_text())
        embedder = load_embedder(out)  # refuses a checkpoint without its serving files
        final = result.metrics or {}  # None only for a run that never reported
        metrics = _metrics(final, baseline, history, wall) | _gate(settings, embedder)
        with console.status(f"pushing {embedder.version}"):
            event = push(settings, out, model="embedder", stage="embedder",
                         version=embedder.version, parent_version=parent_version,
                         data_hash=data_hash, config=cfg.model_dump(mode="json"),
                         metrics=metrics)
    console.print(metrics_table(event, cfg.start))
    return event


def _gate(settings: Settings, embedder) -> dict[str, float]:
    """The rollout gate's validation figures, for the manifest (none when it cannot read its
    validation set: the gate names that when it judges the rollout)."""
    from chatreid.evaluation.gate import GateError, validation_metrics

    if not settings.gate.enabled:
        return {}
    try:
        return validation_metrics(settings, embedder)
    except GateError:
        return {}


def _metrics(final: dict, baseline: dict[str, float], history: list[dict[str, float]],
             wall: float) -> dict[str, float]:
    samples = sum(h["samples"] for h in history)
    busy = sum(h["wall_s"] for h in history)
    scored = [k for k in final if k in _SCORES or k.split("/", 1)[0] in _PARTS]
    return {
        **{k: float(final[k]) for k in scored},
        **{f"baseline_{k}": float(v) for k, v in baseline.items()},
        "first_loss": float(history[0]["loss"]), "loss": float(history[-1]["loss"]),
        "epochs": float(len(history)), "steps": float(history[-1]["step"]),
        "samples_per_s": samples / busy if busy else 0.0, "job_wall_s": wall,
        "dim": float(final["embedder_dim"]),
    }


def metrics_table(event: CheckpointEvent, start: str = "start") -> Table:
    """Before (the start) vs after (trained), per validation part: rank-1 / mAP."""
    m = event.metrics
    parts = [p for p in _PARTS if f"{p}/mAP" in m]
    table = Table("embedder", *(f"{p} rank-1 / mAP" for p in parts), "mean mAP",
                  title=f"prefilter embedder {event.version}")
    for label, prefix in ((f"start: {start}", "baseline_"),
                          ("trained (ID + triplet, BNNeck)", "")):
        table.add_row(label, *(f"{m[f'{prefix}{p}/rank1']:.3f} / {m[f'{prefix}{p}/mAP']:.3f}"
                               for p in parts), f"{m[f'{prefix}mAP']:.3f}")
    table.caption = (f"loss {m['first_loss']:.3f} -> {m['loss']:.3f} over {m['epochs']:.0f} "
                     f"epochs / {m['steps']:.0f} steps; {m['samples_per_s']:.1f} train samples/s")
    return table
