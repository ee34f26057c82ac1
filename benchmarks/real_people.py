"""Real people: prefilter embedders on CUHK03 camera pair 1, imported and fine-tuned.

Reads the research data and weights from ``../shared`` at run time (nothing from there, and
no feature or trained weight, is written into the project: checkpoints go to the local object
store, figures to ``benchmarks/results/real_people.json``). Sections:

* ``imports`` - each embedder on the ``cuhk03_pair1`` task (validation people, camera A -> B,
  B -> A and their mean) and on the synthetic suite's standard task, through the evaluation
  engine (the figures ``chatreid eval`` reports); the OSNet file is also imported as a
  checkpoint (``chatreid embedder import``) and scored by version, to show the import path
  changes nothing;
* ``finetune`` - ``chatreid train --stage embedder`` (Ray Train) from each start on
  ``cuhk03-pair1/train`` + the synthetic world, each scored before and after;
* ``throughput`` - embed crops/s (decode + preprocess + forward, batch 32) on this machine,
  and with ``--e2e`` the embedding service end to end (``benchmarks/ingest.py``) per backbone.

Needs the local stack (`chatreid up --no-ray`) for the import and fine-tuning sections.

    python benchmarks/real_people.py [--sections imports,finetune,throughput] [--e2e]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from common import shared_dir
from PIL import Image
from rich.console import Console
from rich.table import Table

from chatreid.config import Settings
from chatreid.embedder import load_embedder
from chatreid.evaluation import BENCHMARKS, SYNTHETIC, EvalConfig
from chatreid.evaluation.runner import evaluate_task

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir()
console = Console()

EMBEDDERS = {  # label -> (source, card)
    "imagenet-mobilenetv2 (shipped default)": (None, None),
    "osnet_x0_25_msmt17 (ONNX)": (SHARED / "weights" / "osnet_x0_25_msmt17.onnx", None),
    "omz-0287 (ONNX)": (SHARED / "weights" / "person-reidentification-retail-0287.onnx",
                        "openvino"),
}


def real_scores(embedder, data: Path) -> dict[str, float]:
    """mAP / rank-1 per direction and their mean (the task's own figure)."""
    task = BENCHMARKS["cuhk03_pair1"]
    out = {}
    for trial in task.trials:
        one = dataclasses.replace(task, trials=(trial,))
        m = evaluate_task(one, data, embedder.embed, None, EvalConfig()).baseline
        out[f"{trial['direction']}_mAP"], out[f"{trial['direction']}_rank1"] = m.mAP, m.rank(1)
    # the task's figure is the mean of its trials (mean_metrics), as `chatreid eval` reports
    for score in ("mAP", "rank1"):
        out[score] = sum(out[f"{t['direction']}_{score}"] for t in task.trials) / len(task.trials)
    return out


def synthetic_scores(embedder, world: Path) -> dict[str, float]:
    m = evaluate_task(SYNTHETIC["synth_standard"], world, embedder.embed, None,
                      EvalConfig()).baseline
    return {"mAP": m.mAP, "rank1": m.rank(1)}


def section_imports(settings: Settings, data: Path, world: Path) -> list[dict]:
    from chatreid.embedder.importer import import_onnx
    from chatreid.embedder.load import resolve_embedder

    rows = []
    for label, (source, card) in EMBEDDERS.items():
        emb = load_embedder(source, card=card)
        with console.status(f"scoring {label}"):
            rows.append({"embedder": label, "version": emb.version, "dim": emb.dim,
                         "real": real_scores(emb, data), "synthetic": synthetic_scores(emb, world)})
        console.print(f"{label}: real {rows[-1]['real']}")
    source, card = EMBEDDERS["osnet_x0_25_msmt17 (ONNX)"]
    event = import_onnx(settings, source, card)
    imported = resolve_embedder(settings, event.version)  # as `chatreid eval --embedder VERSION`
    rows.append({"embedder": "osnet_x0_25_msmt17 imported (by checkpoint version)",
                 "version": imported.version, "dim": imported.dim,
                 "real": real_scores(imported, data),
                 "synthetic": synthetic_scores(imported, world)})
    return rows


def section_finetune(settings: Settings, data: Path, world: Path, starts: list[str],
                     epochs: int) -> list[dict]:
    from chatreid.tuning.embedder_training import EmbedderTrainConfig
    from ray_jobs.train_embedder import train_embedder

    osnet = str(EMBEDDERS["osnet_x0_25_msmt17 (ONNX)"][0])
    recipes = {
        # a head on frozen features: a step costs ~nothing, so more of them
        "osnet-head": dict(start=osnet, epochs=2 * epochs, lr=3.5e-4, p=16, k=4),
        "imagenet": dict(start="imagenet", epochs=epochs, height=160, width=64, p=16, k=4),
        "imagenet+osnet-teacher": dict(start="imagenet", teacher=osnet, epochs=epochs,
                                       height=160, width=64, p=16, k=4),
    }
    rows = []
    for name in starts:
        cfg = EmbedderTrainConfig(world_root=world, real_root=data, **recipes[name])
        t0 = time.perf_counter()
        event = train_embedder(settings, cfg, console=console)
        m = event.metrics
        rows.append({"start": name, "version": event.version, "epochs": cfg.epochs,
                     "wall_s": time.perf_counter() - t0,
                     "before": {p: {"mAP": m[f"baseline_{p}/mAP"],
                                    "rank1": m[f"baseline_{p}/rank1"]}
                                for p in ("real", "synthetic")},
                     "after": {p: {"mAP": m[f"{p}/mAP"], "rank1": m[f"{p}/rank1"]}
                               for p in ("real", "synthetic")},
                     "config": {k: str(v) for k, v in recipes[name].items()}})
        console.print(f"{name}: {rows[-1]['before']} -> {rows[-1]['after']}")
    return rows


def section_throughput(data: Path, e2e: bool) -> list[dict]:
    files = sorted((data / "val").glob("*.jpg"))[:256]
    blobs = [f.read_bytes() for f in files]
    rows = []
    for label, (source, card) in EMBEDDERS.items():
        emb = load_embedder(source, card=card, batch_size=32)
        emb.embed([Image.open(io.BytesIO(blobs[0]))])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(blobs), 32):
            emb.embed([Image.open(io.BytesIO(b)) for b in blobs[i:i + 32]])
        row = {"embedder": label, "forward_crops_per_s": len(blobs) / (time.perf_counter() - t0)}
        if e2e:
            row["end_to_end"] = _ingest(source, card)
        rows.append(row)
        console.print(row)
    return rows


def _ingest(source: Path | None, card: str | None) -> dict:
    """benchmarks/ingest.py with this backbone in the embedding service."""
    env = dict(os.environ)
    if source is not None:
        env["CHATREID_EMBEDDER__WEIGHTS"] = str(source)
    if card is not None:
        env["CHATREID_EMBEDDER__CARD"] = card
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ingest.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--crops", "600",
                        "--out", str(out)], check=True, env=env, cwd=ROOT)
        report = json.loads(out.read_text())
    e2e = report["end_to_end"]
    return {"crops": e2e["crops"], "crops_per_s": e2e["crops_per_s"],
            "latency_p50_s": e2e["latency_p50_s"], "latency_p95_s": e2e["latency_p95_s"],
            "forward_crops_per_s": report["embedder"]["forward_crops_per_s"]}


def table(report: dict) -> Table:
    t = Table("embedder", "A→B mAP", "B→A mAP", "cuhk03_pair1 mAP / R1", "synthetic mAP",
              title="prefilter embedders on real people (CUHK03 pair 1, 100 people)")
    for r in report.get("imports", []):
        real = r["real"]
        t.add_row(r["embedder"], f"{real['a2b_mAP']:.3f}", f"{real['b2a_mAP']:.3f}",
                  f"{real['mAP']:.3f} / {real['rank1']:.3f}", f"{r['synthetic']['mAP']:.3f}")
    for r in report.get("finetune", []):
        b, a = r["before"], r["after"]
        t.add_row(f"fine-tuned from {r['start']}", "", "",
                  f"{b['real']['mAP']:.3f} → {a['real']['mAP']:.3f}",
                  f"{b['synthetic']['mAP']:.3f} → {a['synthetic']['mAP']:.3f}")
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "cuhk03-pair1")
    p.add_argument("--sections", default="imports,finetune,throughput")
    p.add_argument("--starts", default="osnet-head,imagenet+osnet-teacher",
                   help="fine-tuning starts: osnet-head, imagenet, imagenet+osnet-teacher")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--e2e", action="store_true", help="also the embedding service end to end")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                   "real_people.json")
    args = p.parse_args()
    if not (args.data / "val").is_dir():
        console.print(f"[red]no real data at {args.data}[/] (see ../shared/data/README)")
        return 2
    from ray_jobs.train import PRESETS, ensure_world

    settings = Settings()
    world = ensure_world(settings, PRESETS["default"], console)
    sections = set(args.sections.split(","))
    report: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    # when each section was measured: a partial run must not re-date the sections it kept
    measured = report.get("measured") or {
        k: report["created_at"] for k in ("imports", "finetune", "throughput") if k in report}
    report["measured"] = {**measured, **dict.fromkeys(sections, now)}
    report.update({"created_at": now,
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                   "data": "cuhk03-pair1 (val: 100 people, 938 images; train: 743 people)"})
    if "imports" in sections:
        report["imports"] = section_imports(settings, args.data, world)
    if "finetune" in sections:
        report["finetune"] = section_finetune(settings, args.data, world,
                                              args.starts.split(","), args.epochs)
    if "throughput" in sections:
        report["throughput"] = section_throughput(args.data, args.e2e)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(table(report))
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
