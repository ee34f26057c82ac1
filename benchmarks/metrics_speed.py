"""Metric computation time at Market-1501's test size: CMC, mAP and mINP for 3,368 queries ×
15,913 gallery items under the market1501 protocol (target: under 2 s on this machine).

Data: a random float32 distance matrix with Market-like labels - 751 identities (plus junk -1
and distractors 0 in the gallery), 6 cameras - drawn with a fixed seed; queries' true matches
are pulled closer so the ranking is not uniform.

    python benchmarks/metrics_speed.py [--queries 3368] [--gallery 15913] [--repeats 3]
        [--out benchmarks/results/metrics_speed.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import header, write
from rich.console import Console

from chatreid.metrics import Labels, rank_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=15913)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metrics_speed.json"))
    args = p.parse_args()
    console = Console()
    rng = np.random.default_rng(0)
    q = Labels(rng.integers(1, 752, args.queries), rng.integers(1, 7, args.queries))
    g = Labels(rng.integers(-1, 752, args.gallery), rng.integers(1, 7, args.gallery))
    distmat = rng.random((args.queries, args.gallery), dtype=np.float32)
    distmat[q.pids[:, None] == g.pids[None, :]] *= 0.3
    times, metrics = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics = rank_metrics(distmat, q, g, "market1501")
        times.append(time.perf_counter() - t0)
    report = header("metrics_speed", __doc__, args, torch_threads=torch.get_num_threads())
    report.update(seconds_best=min(times), seconds_all=times, target_s=2.0,
                  meets_target=min(times) < 2.0, metrics=metrics.summary())
    console.print(f"{args.queries} x {args.gallery}: {min(times):.2f} s best of "
                  f"{args.repeats} (target < 2 s); rank-1 {metrics.rank(1):.3f}, "
                  f"mAP {metrics.mAP:.3f}, mINP {metrics.mINP:.3f}")
    write(args.out, report, console)


if __name__ == "__main__":
    main()
