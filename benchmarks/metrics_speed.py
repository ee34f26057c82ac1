"""Metric computation time at Market-1501's test size: CMC, mAP and mINP for 3,368 queries ×
15,913 gallery items under the market1501 protocol (target: under 2 s on this machine).

Data: a random float32 distance matrix with Market-like labels - 751 identities (plus junk -1
and distractors 0 in the gallery), 6 cameras - drawn with a fixed seed; queries' true matches
are pulled closer so the ranking is not uniform.

    python benchmarks/metrics_speed.py [--queries 3368] [--gallery 15913] [--repeats 3]
        [--compare-sorted] [--out benchmarks/results/metrics_speed.json]

``--compare-sorted`` also times the sorting path (every row stably sorted, as before ranks were
counted) on the same data and records whether both give the same metrics.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import header, write
from rich.console import Console

from chatreid.metrics import PROTOCOLS, Labels, Metrics, rank_metrics
from chatreid.metrics.protocols import _rank_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=15913)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-sorted", action="store_true",
                   help="also time the sort-every-row path on the same data")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metrics_speed.json"))
    args = p.parse_args()
    console = Console()
    rng = np.random.default_rng(0)
    q = Labels(rng.integers(1, 752, args.queries), rng.integers(1, 7, args.queries))
    g = Labels(rng.integers(-1, 752, args.gallery), rng.integers(1, 7, args.gallery))
    distmat = rng.random((args.queries, args.gallery), dtype=np.float32)
    distmat[q.pids[:, None] == g.pids[None, :]] *= 0.3
    times, metrics = _timed(lambda: rank_metrics(distmat, q, g, "market1501"), args.repeats)
    report = header("metrics_speed", __doc__, args, torch_threads=torch.get_num_threads())
    report.update(seconds_best=min(times), seconds_all=times, target_s=2.0,
                  meets_target=min(times) < 2.0, metrics=metrics.summary())
    console.print(f"{args.queries} x {args.gallery}: {min(times):.2f} s best of "
                  f"{args.repeats} (target < 2 s); rank-1 {metrics.rank(1):.3f}, "
                  f"mAP {metrics.mAP:.3f}, mINP {metrics.mINP:.3f}")
    if args.compare_sorted:
        sorted_times, sorted_metrics = _timed(
            lambda: _rank_metrics(distmat, q, g, PROTOCOLS["market1501"], similarity=False,
                                  max_rank=50, chunk=512, seed=0, counted=False), args.repeats)
        report.update(seconds_sorted_best=min(sorted_times), seconds_sorted_all=sorted_times,
                      same_as_sorted=_same(metrics, sorted_metrics))
        console.print(f"sorting every row: {min(sorted_times):.2f} s best; same metrics: "
                      f"{report['same_as_sorted']}")
    write(args.out, report, console)


def _timed(score: Callable[[], Metrics], repeats: int) -> tuple[list[float], Metrics]:
    times, metrics = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics = score()
        times.append(time.perf_counter() - t0)
    assert metrics is not None
    return times, metrics


def _same(a: Metrics, b: Metrics) -> bool:
    """Equal up to float rounding (the two paths sum AP terms in different orders)."""
    return (np.allclose(a.cmc, b.cmc, rtol=0, atol=1e-12) and abs(a.mAP - b.mAP) < 1e-12
            and abs(a.mINP - b.mINP) < 1e-12 and (a.queries, a.skipped) == (b.queries, b.skipped))


if __name__ == "__main__":
    main()
