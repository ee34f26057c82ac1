"""The k-reciprocal shortlist (``serve.shortlist_order``): its settings chosen on training people,
then measured on people it never saw - the prefilter alone, no VLM (that is
``rerank_quality.py --shortlist-order k_reciprocal``).

* ``choice`` - cuhk03-pair1 *train* people (a seeded sample; one camera-a image per person
  queries every camera-b image of the sample) with the imported OSNet: mAP and rank-1 of the
  cosine order and of each (k1, lambda) on the grid. The rule: the highest mAP whose rank-1 is
  no more than half a point below the cosine order's (an investigator reads the first answer
  first). The settings' defaults (``serve.k_reciprocal_k1``, ``k_reciprocal_lambda``) must be
  the choice: the script says when they are not.
* ``held_out`` - with the settings' values: ``cuhk03_pair1`` (validation people, OSNet) and the
  synthetic image tasks (the given embedder), cosine vs the k-reciprocal order, and what the
  re-ordering costs per query.

Real data is read from ``../shared`` at run time; nothing derived from it is written but these
figures. Synthetic tasks need the local stack (the embedder from object storage).

    python benchmarks/shortlist_order.py [--embedder latest] [--people 500]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common import shared_dir
from PIL import Image
from rich.console import Console
from rich.table import Table

from chatreid.config import Settings
from chatreid.embedder import load_embedder
from chatreid.embedder.load import resolve_embedder
from chatreid.evaluation import SYNTHETIC, EvalConfig
from chatreid.evaluation.runner import evaluate_task, k_reciprocal_shortlists
from chatreid.evaluation.tasks import BENCHMARKS
from chatreid.metrics import Labels, compute_distmat, rank_metrics

SHARED = shared_dir()
OSNET = SHARED / "weights" / "osnet_x0_25_msmt17.onnx"
CUHK03 = SHARED / "data" / "cuhk03-pair1"
OUT = Path(__file__).parent / "results" / "shortlist_order.json"
GRID = [(k1, lam) for k1 in (10, 20) for lam in (0.3, 0.5, 0.7)]
IMAGE_TASKS = ("synth_standard", "synth_cloth_changing", "synth_visible_infrared")
console = Console()


def figures(metrics) -> dict[str, float]:
    return {"mAP": 100 * metrics.mAP, "rank1": 100 * float(metrics.cmc[0])}


def train_people(people: int, seed: int) -> tuple[list, list]:
    """A seeded sample of cuhk03-pair1 train people: (queries, gallery) records."""
    from chatreid.data.datasets.cuhk03_pair1 import CUHK03Pair1

    train = CUHK03Pair1(CUHK03).train
    pids = sorted({r.pid for r in train})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(pids, min(people, len(pids)), replace=False).tolist())
    queries: dict[int, object] = {}
    for r in train:
        if r.pid in chosen and r.camid == 0:
            queries.setdefault(r.pid, r)
    gallery = [r for r in train if r.pid in chosen and r.camid == 1]
    return list(queries.values()), gallery


def choice(settings: Settings, people: int, seed: int, pool: int) -> dict:
    osnet = load_embedder(OSNET)
    queries, gallery = train_people(people, seed)

    def embed(records) -> np.ndarray:
        return osnet.embed([Image.open(r.path).convert("RGB") for r in records])

    qf, gf = embed(queries), embed(gallery)
    ql = Labels(np.array([r.pid for r in queries]), np.zeros(len(queries), np.int64))
    gl = Labels(np.array([r.pid for r in gallery]), np.ones(len(gallery), np.int64))
    dist = compute_distmat(qf, gf)
    cosine = figures(rank_metrics(dist, ql, gl, "market1501"))
    grid = []
    for k1, lam in GRID:
        d = k_reciprocal_shortlists(dist, qf, gf, pool=pool, k1=k1, lambda_value=lam)
        grid.append({"k1": k1, "lambda": lam, **figures(rank_metrics(d, ql, gl, "market1501"))})
    allowed = [g for g in grid if g["rank1"] >= cosine["rank1"] - 0.5] or grid
    best = max(allowed, key=lambda g: g["mAP"])
    serve = settings.serve
    return {"people": len(queries), "gallery": len(gallery), "embedder": osnet.version,
            "pool": pool, "cosine": cosine, "grid": grid,
            "chosen": {"k1": best["k1"], "lambda": best["lambda"]},
            "settings": {"k1": serve.k_reciprocal_k1, "lambda": serve.k_reciprocal_lambda}}


def held_out(settings: Settings, embedder_name: str, world: Path) -> list[dict]:
    serve = settings.serve
    configs = {order: EvalConfig(shortlist_order=order, pool=serve.k_reciprocal_pool,
                                 k1=serve.k_reciprocal_k1, lambda_value=serve.k_reciprocal_lambda)
               for order in ("cosine", "k_reciprocal")}
    jobs = []
    if OSNET.is_file() and CUHK03.is_dir():
        jobs.append((BENCHMARKS["cuhk03_pair1"], CUHK03, load_embedder(OSNET)))
    if embedder_name:
        synthetic = resolve_embedder(settings, embedder_name)
        jobs += [(SYNTHETIC[name], world, synthetic) for name in IMAGE_TASKS]
    rows = []
    for task, root, embedder in jobs:
        row: dict = {"task": task.name, "embedder": embedder.version}
        for order, cfg in configs.items():
            start = time.perf_counter()
            result = evaluate_task(task, root, embedder.embed, None, cfg)
            row[order] = figures(result.baseline)
            row[f"{order}_s"] = time.perf_counter() - start
            row["queries"] = result.queries
        console.log(f"{task.name}: cosine {row['cosine']}, k-reciprocal {row['k_reciprocal']}")
        rows.append(row)
    return rows


def reorder_cost(settings: Settings, dim: int = 512, reps: int = 50) -> dict:
    """Milliseconds to re-order one query's pool (the serving path's added work)."""
    from chatreid.metrics import k_reciprocal_order

    rng = np.random.default_rng(0)
    serve = settings.serve
    pool = rng.normal(size=(serve.k_reciprocal_pool, dim)).astype(np.float32)
    query = rng.normal(size=dim).astype(np.float32)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        k_reciprocal_order(query, pool, k1=serve.k_reciprocal_k1,
                           lambda_value=serve.k_reciprocal_lambda)
        times.append((time.perf_counter() - start) * 1000)
    return {"pool": serve.k_reciprocal_pool, "dim": dim, "p50_ms": float(np.median(times))}


def show(report: dict) -> None:
    c = report.get("choice")
    if c:
        table = Table("k1", "lambda", "mAP", "rank-1", title=f"cuhk03-pair1 train, {c['people']} "
                      f"people: choosing (cosine {c['cosine']['mAP']:.1f} / "
                      f"{c['cosine']['rank1']:.1f})")
        for g in c["grid"]:
            table.add_row(str(g["k1"]), str(g["lambda"]), f"{g['mAP']:.1f}", f"{g['rank1']:.1f}")
        console.print(table)
        console.print(f"chosen: {c['chosen']}; settings: {c['settings']}")
    table = Table("task", "queries", "cosine", "k-reciprocal order",
                  title="held out (mAP / rank-1)")
    for r in report.get("held_out", []):
        table.add_row(r["task"], str(r["queries"]),
                      f"{r['cosine']['mAP']:.1f} / {r['cosine']['rank1']:.1f}",
                      f"{r['k_reciprocal']['mAP']:.1f} / {r['k_reciprocal']['rank1']:.1f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embedder", default="latest",
                    help="the synthetic tasks' prefilter ('' skips them)")
    ap.add_argument("--people", type=int, default=500, help="train people sampled to choose")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    settings = Settings()
    report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, "
                               f"{len(__import__('os').sched_getaffinity(0))} CPUs"}
    if OSNET.is_file() and CUHK03.is_dir():
        report["choice"] = choice(settings, args.people, args.seed,
                                  settings.serve.k_reciprocal_pool)
        if report["choice"]["chosen"] != report["choice"]["settings"]:
            console.print(f"[yellow]the settings' defaults {report['choice']['settings']} are "
                          f"not the choice {report['choice']['chosen']}[/yellow]")
    report["held_out"] = held_out(settings, args.embedder, settings.train.world)
    report["cost"] = reorder_cost(settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    show(report)
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
