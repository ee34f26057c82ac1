"""HPT chain benchmark: the offline default model trained embedder → S1 → S2 → S3 on the default
small synthetic site, as Ray Train jobs on this machine; per stage samples/s, peak memory, loss
and held-out best-choice rank-1; the whole chain's wall time against the preset's budget
(``TrainRecipe.wall_budget_min``: default 60 min, quick 20 min).

Needs the local stack (`chatreid up --no-ray`). Each run uses its own bucket and topics.

    python benchmarks/hpt_chain.py [--preset default] [--no-embedder] [--ablation 1+2+3]
        [--bucket bench-hpt-TAG] [--out FILE]
    python benchmarks/hpt_chain.py --preset quick --out benchmarks/results/hpt_chain_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from chatreid.bus import ensure_topics
from chatreid.config import Settings
from chatreid.storage import ObjectStore
from chatreid.viz import bar_chart
from ray_jobs.train import PRESETS, identity_source, train


def budget_min(preset: str) -> float:
    """The wall time the preset is sized for (minutes); a preset without one has no target."""
    budget = PRESETS[preset].wall_budget_min
    if budget is None:
        raise SystemExit(f"preset {preset!r} names no wall budget: nothing to measure against")
    return budget


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--no-embedder", action="store_true")
    ap.add_argument("--embedder-only", action="store_true",
                    help="train only the embedder and add its figures to an existing result "
                         "(the chain's total then counts both runs)")
    ap.add_argument("--ablation", default="1+2+3")
    ap.add_argument("--bucket", help="run in an earlier run's bucket and topics (bench-hpt-TAG), "
                                     "e.g. the other Table 4 chains with --no-embedder: they "
                                     "reuse its embedder, world and datasets")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hpt_chain.json"))
    args = ap.parse_args()
    console = Console()
    target_min = budget_min(args.preset)

    settings = Settings()
    name = args.bucket or f"bench-hpt-{uuid.uuid4().hex[:8]}"
    settings.s3.bucket = name
    settings.kafka.topic_prefix = name
    settings.train.out_dir = Path("out/bench-hpt")
    settings.train.checkpoint_every = 100
    ObjectStore(settings.s3).ensure_bucket()
    ensure_topics(settings.kafka)

    if args.embedder_only:
        add_embedder(args.out, settings, args.preset, console)
        return
    if args.no_embedder:
        pin_identity_backbone(settings, console)
    t0 = time.perf_counter()
    report = train(settings, "all", recipe=PRESETS[args.preset], ablation=args.ablation,
                   include_embedder=not args.no_embedder, console=console)
    wall_min = (time.perf_counter() - t0) / 60
    backbone = identity_source(settings, report.embedder)

    stages = [{
        "stage": s.stage, "version": s.version, "wall_s": round(s.wall_s, 1),
        "train_samples_per_s": round(s.metrics.get("train_samples_per_s", 0), 3),
        "samples_per_s_with_checkpoints": round(s.metrics.get("samples_per_s", 0), 3),
        "peak_rss_mib_per_worker": round(s.metrics.get("peak_rss_mib", 0)),
        "loss_first": round(s.metrics.get("first_loss", 0), 4),
        "loss_last": round(s.metrics.get("loss", 0), 4),
        "eval_rank1": round(s.metrics.get("eval/rank1", float("nan")), 4),
        "eval_chance_rank1": round(s.metrics.get("eval/chance_rank1", float("nan")), 4),
        "eval_truth_confidence": round(s.metrics.get("eval/truth_confidence", float("nan")), 4),
        "eval_rank1_per_task": {k.removeprefix("eval/rank1/"): round(v, 4)
                                for k, v in s.metrics.items() if k.startswith("eval/rank1/")},
    } for s in report.stages]
    embedder = report.embedder.metrics if report.embedder else None
    result = {
        "benchmark": "hpt_chain",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": None},
        "preset": args.preset, "ablation": args.ablation, "base_model": report.base_model,
        "bucket": settings.s3.bucket,
        "workers": settings.train.num_workers,
        "chain_wall_min": round(wall_min, 2), "target_min": target_min,
        "target_met": wall_min <= target_min,
        "embedder": embedder, "identity_backbone": backbone, "stages": stages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    chart = bar_chart(
        [f"stage {s['stage']}" for s in stages], [s["eval_rank1"] for s in stages],
        title="held-out best-choice rank-1 after each stage",
        reference=stages[0]["eval_chance_rank1"] if stages else None,
        reference_label="chance",
    )
    chart_path = args.out.with_suffix(".png")
    chart.save(chart_path)
    console.print(f"chain wall time {wall_min:.1f} min (target <= {target_min:g} min: "
                  f"{'met' if result['target_met'] else 'MISSED'})")
    console.print(f"results: {args.out}, chart: {chart_path}")


def pin_identity_backbone(settings: Settings, console: Console) -> None:
    """A chain without the embedder stage reuses the bucket's embedder, and its identity head
    must sit on that embedder too. 'prefilter' would name the embedder *serving* there, and in
    a benchmark bucket none is ever rolled out, so the head fell back to ImageNet MobileNetV2
    while the chain it is compared with had the trained one (Table 4's "2+3" and "1+2+3"
    chains were measured that way)."""
    from chatreid.checkpoints import latest

    newest = latest(settings, "embedder", "embedder")
    if settings.train.vision_backbone == "prefilter" and newest is not None:
        settings.train.vision_backbone = newest.version
        console.print(f"identity head over the bucket's embedder {newest.version}")


def add_embedder(out: Path, settings: Settings, preset: str, console: Console) -> None:
    result = json.loads(out.read_text())
    t0 = time.perf_counter()
    report = train(settings, "embedder", recipe=PRESETS[preset], console=console)
    wall_min = (time.perf_counter() - t0) / 60
    result["embedder"] = {**(report.embedder.metrics if report.embedder else {}),
                          "wall_min": round(wall_min, 2)}
    result["chain_wall_min"] = round(result["chain_wall_min"] + wall_min, 2)
    result["target_met"] = result["chain_wall_min"] <= result["target_min"]
    result["note"] = "VLM stages and the embedder measured in two runs; the total adds both"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"embedder {wall_min:.1f} min; chain total {result['chain_wall_min']:.1f} min")


if __name__ == "__main__":
    main()
