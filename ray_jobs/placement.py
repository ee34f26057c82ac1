"""Waiting for the cluster to place a job's actors (or a placement group), saying what it waits
for, and failing with what was needed and what is free after ``ray.placement_timeout_s``.

Ray keeps an unplaceable actor pending forever without a word (e.g. while a Serve app holds the
local head's CPUs); every job that starts actors waits here instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import ray
from tqdm import tqdm


class ClusterBusy(RuntimeError):
    """The cluster could not place a job's actors within ``ray.placement_timeout_s``."""


def cpu_summary() -> tuple[float, float]:
    """(free, total) CPUs of the cluster now."""
    return (float(ray.available_resources().get("CPU", 0.0)),
            float(ray.cluster_resources().get("CPU", 0.0)))


def _stderr(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # between progress bars, never swallowed by a log level


def wait_for_placement(probes: Sequence[ray.ObjectRef], cpus_each: float, timeout_s: float,
                       what: str = "actors", report_every_s: float = 10.0,
                       say: Callable[[str], None] = _stderr) -> list[int]:
    """Wait for ``probes`` (one ref per actor or bundle that resolves once it is placed, e.g.
    a trivial method call or ``placement_group.ready()``), saying every ``report_every_s`` how
    many are still pending and what the cluster has free. Returns the indices placed within
    ``timeout_s``; :class:`ClusterBusy` when none was."""
    pending = {ref: i for i, ref in enumerate(probes)}
    placed: list[int] = []
    start = time.monotonic()
    while pending:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            break
        ready, _ = ray.wait(list(pending), num_returns=len(pending),
                            timeout=min(report_every_s, left))
        for ref in ready:
            ray.get(ref)  # an actor that failed to start raises here
            placed.append(pending.pop(ref))
        if pending:
            free, total = cpu_summary()
            say(f"waiting for {len(pending)} of {len(probes)} {what} needing {cpus_each:g} CPU "
                f"each; the cluster has {free:g} of {total:g} CPUs free "
                f"({time.monotonic() - start:.0f}s of ray.placement_timeout_s={timeout_s:g})")
    if placed or not probes:
        return sorted(placed)
    free, total = cpu_summary()
    raise ClusterBusy(
        f"the cluster could not place any of {len(probes)} {what} needing {cpus_each:g} CPU "
        f"each within {timeout_s:g}s: it has {free:g} of {total:g} CPUs free. Something else "
        "holds them (e.g. a Serve app: `chatreid down` or `serve shutdown`), or ask for less "
        "(--workers, fewer CPUs each), or wait longer (CHATREID_RAY__PLACEMENT_TIMEOUT_S)")


def place_actors(actors: list, cpus_each: float, timeout_s: float, what: str = "actors",
                 report_every_s: float = 10.0, say: Callable[[str], None] = _stderr) -> list:
    """:func:`wait_for_placement` for actors with a cheap ``placed()`` method: the placed ones;
    those still pending at the bound are killed (the job goes on with fewer)."""
    placed = wait_for_placement([a.placed.remote() for a in actors], cpus_each, timeout_s,
                                what, report_every_s, say)
    if len(placed) < len(actors):
        for i, actor in enumerate(actors):
            if i not in placed:
                ray.kill(actor)
        free, total = cpu_summary()
        say(f"going on with {len(placed)} of {len(actors)} {what}: the cluster could not place "
            f"the others within {timeout_s:g}s ({free:g} of {total:g} CPUs free)")
    return [actors[i] for i in placed]
