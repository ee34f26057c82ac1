"""Ingest benchmark: sustained crops/s end to end and capture-to-searchable latency, beside the
embedder's own forward throughput on the same crops, in the same run, on this machine.

End to end = the ingestor validates, stores and publishes each crop (capture time = the moment
it is handed over), the embedding service (its own process, as deployed) consumes, fetches,
embeds and writes the indexed log, and a prefilter reader applies it to a FAISS store: a crop
counts once it is searchable there. The clock starts once a warm-up crop (not counted) is
searchable, i.e. once the service has loaded its model and joined its group. Needs the local
stack (`chatreid up --no-ray`).

The forward reference is decode + preprocess + forward on the same crops, measured two ways: one
batch at a time on torch's default threads (the reference before the service ran batches side by
side), and as the service runs it (``embedder.forward_workers`` batches at once on
``forward_threads`` threads each). The pipeline is compared to the better of the two, so the
service's thread layout can raise the ratio only by what it saves beyond the forward itself.

Two layouts, measured one after the other in the same run, each against its own forward:

* ``shared``: every process on every core (this machine as one box);
* ``own core``: the embedding service and its forward reference pinned to the last core, the
  broker, the object store, the ingestor and the reader to the others - the deployment's shape,
  where the servers run on hosts of their own, so the ratio shows what the pipeline itself
  costs the embedder. Skipped on a 1-core machine.

    python benchmarks/ingest.py [--crops 1000] [--out benchmarks/results/ingest.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from chatreid.app.stack import LocalStack
from chatreid.bus import ensure_topics
from chatreid.config import Settings
from chatreid.embedder import Embedder, embedder_from_settings
from chatreid.prefilter.follower import IndexFollower
from chatreid.storage import ObjectStore
from chatreid.synth import SynthConfig, iter_live_crops
from services.embedder.service import forward_threads
from services.ingestor import CropInput, Ingestor

TARGET = 0.8  # issue 18: the pipeline sustains at least this share of the forward


def render_crops(n: int, seed: int) -> list:
    return list(iter_live_crops(SynthConfig(seed=seed), start_time=0.0, limit=n))


def embedder_forward_throughput(settings: Settings, crops: list, batch: int,
                                workers: int = 1, threads: int = 0,
                                fold_norms: bool = True) -> float:
    """Decode + preprocess + forward, nothing else, on ``workers`` threads of ``threads``
    intra-op threads each (0: torch's default); ``fold_norms=False``: a torch embedder's
    network as trained, its BatchNorms not folded into the convolutions."""
    embedder = embedder_from_settings(settings.embedder)
    if not fold_norms and isinstance(embedder, Embedder):
        embedder = Embedder(embedder.model, model_id=embedder.model_id, height=embedder.height,
                            width=embedder.width, device=embedder.device,
                            batch_size=embedder.batch_size, fold_norms=False)
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)

    def forward(chunk: list) -> None:
        embedder.embed([Image.open(io.BytesIO(c.jpeg)) for c in chunk])

    chunks = [crops[i:i + batch] for i in range(0, len(crops), batch)]
    try:
        forward(chunks[0])  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(forward, chunks))
        return len(crops) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(default)


def forward_ceiling(settings: Settings, crops: list) -> dict[str, float]:
    """The embedder's forward throughput two ways: one forward at a time on torch's default
    threads, and as the embedding service runs it (``forward_workers`` batches at once, each on
    ``forward_threads`` threads). The better of the two is the ceiling the pipeline is compared
    to, so a service setting can never look good against a slower reference. A third figure,
    not part of the ceiling: as the service runs it but with the network as trained (its
    BatchNorms not folded), what folding gains."""
    cfg = settings.embedder
    plain = embedder_forward_throughput(settings, crops, cfg.batch_size)
    as_served = embedder_forward_throughput(settings, crops, cfg.batch_size,
                                            cfg.forward_workers, forward_threads(cfg))
    as_trained = embedder_forward_throughput(settings, crops, cfg.batch_size,
                                             cfg.forward_workers, forward_threads(cfg),
                                             fold_norms=False)
    return {"one_forward_default_threads": plain, "as_the_service_runs_it": as_served,
            "as_the_service_runs_it_norms_not_folded": as_trained,
            "ceiling": max(plain, as_served)}


def pin(pids: Iterable[int], cores: set[int]) -> None:
    """Every thread of each process (and of its children) onto ``cores``; threads they start
    later inherit it. (``sched_setaffinity`` of a pid moves only that one thread.)"""
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                threads = proc.threads()
            except psutil.Error:
                continue
            for t in threads:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.sched_setaffinity(t.id, cores)  # unless the thread ended meanwhile


def pinned_to(cores: set[int]) -> Callable[[], None]:
    """A ``preexec_fn`` that starts a child process on ``cores`` only."""
    return lambda: os.sched_setaffinity(0, cores)


def start_service(cmd: list[str], env: dict[str, str], servers: Iterable[int],
                  embedder_cores: set[int] | None) -> subprocess.Popen:
    """Start the embedding service; with ``embedder_cores``, on those cores only, and the
    servers and this process on the others. The others are pinned first: :func:`pin` moves a
    process's children too, and the service is this process's child (pinned after it, the
    service would leave its core and share the servers' - a run measured that way put the
    embedder beside everything else and called it its own core)."""
    if embedder_cores:
        pin([*servers, os.getpid()], set(range(os.cpu_count() or 1)) - embedder_cores)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=pinned_to(embedder_cores) if embedder_cores else None)


def cores_of(pid: int) -> list[int]:
    """Every core any thread of ``pid`` may run on: what the report says the layout was."""
    cores: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            cores |= os.sched_getaffinity(int(tid))
    return sorted(cores)


def forward_ceiling_on(cores: set[int], settings: Settings, crops: list) -> dict[str, float]:
    """:func:`forward_ceiling` in a child process pinned to ``cores`` (torch sizes its thread
    pools from the affinity it starts with, as the pinned embedding service's do)."""
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        pickle.dump(crops, f)
        f.flush()
        out = subprocess.run([sys.executable, __file__, "--forward-only", f.name],
                             env=env_for(settings), preexec_fn=pinned_to(cores),
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def isolated(settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(deep=True)
    s.kafka.topic_prefix, s.s3.bucket = f"bench{tag}", f"bench{tag}"
    s.embedder.group_id = f"bench{tag}"
    ObjectStore(s.s3).ensure_bucket()
    ensure_topics(s.kafka)
    return s


def env_for(s: Settings) -> dict[str, str]:
    return {**os.environ, "CHATREID_KAFKA__TOPIC_PREFIX": s.kafka.topic_prefix,
            "CHATREID_S3__BUCKET": s.s3.bucket, "CHATREID_EMBEDDER__GROUP_ID": s.embedder.group_id,
            "CHATREID_EMBEDDER__BATCH_SIZE": str(s.embedder.batch_size),
            "CHATREID_EMBEDDER__FORWARD_WORKERS": str(s.embedder.forward_workers),
            "CHATREID_EMBEDDER__TORCH_THREADS": str(s.embedder.torch_threads)}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = t.user + t.system + t.children_user + t.children_system
    return out


def submit(ingestor: Ingestor, c) -> None:
    ingestor.submit(CropInput(data=c.jpeg, camera=c.camera, modality=c.modality,
                              capture_time=datetime.now(UTC), track_id=c.track_id, bbox=c.bbox))


def wait_until_ready(settings: Settings, follower: IndexFollower, warmup) -> None:
    """One warm-up crop (not counted) through the whole path: once it is searchable, the
    embedder has loaded its model and joined its group, which is not ingest time. (A fixed
    8 s wait stood here; on a busy machine start-up took longer and was timed as ingest.)"""
    ingestor = Ingestor(settings, source="bench")
    submit(ingestor, warmup)
    ingestor.close()
    deadline = time.time() + 300
    while (follower.store is None or not len(follower.store)) and time.time() < deadline:
        follower.poll(timeout_ms=100)
    if follower.store is None or not len(follower.store):
        raise RuntimeError("the embedding service indexed no warm-up crop within 300 s")
    follower.stats.latencies_s.clear()


def end_to_end(settings: Settings, crops: list, warmup, servers: dict[str, int],
               embedder_cores: set[int] | None = None) -> dict:
    """``embedder_cores``: the embedding service runs on these cores only and everything else
    (the servers, this process: ingestor + reader) on the remaining ones, until the run ends."""
    everything = set(range(os.cpu_count() or 1))
    proc = start_service([sys.executable, "-m", "chatreid", "embed", "--no-snapshots",
                          "--until-idle", "20"], env_for(settings), servers.values(),
                         embedder_cores)
    try:
        return _timed_run(settings, crops, warmup, servers, proc)
    finally:
        if embedder_cores:
            pin([*servers.values(), os.getpid()], everything)


def _timed_run(settings: Settings, crops: list, warmup, servers: dict[str, int],
               proc: subprocess.Popen) -> dict:
    follower = IndexFollower(settings, keep_latencies=True)
    follower.poll(timeout_ms=100)  # joins the log before the first event arrives
    wait_until_ready(settings, follower, warmup)
    total = len(crops) + 1  # with the warm-up crop

    def produce() -> None:
        ingestor = Ingestor(settings, source="bench")
        for c in crops:
            submit(ingestor, c)
        ingestor.close()

    pids = {**servers, "embedding service": proc.pid,
            "ingestor + reader (this process)": os.getpid()}
    cpu0 = cpu_seconds(pids)
    t0 = time.time()
    producer = threading.Thread(target=produce)
    producer.start()
    deadline, first = t0 + 900, None
    while (follower.store is None or len(follower.store) < total) and time.time() < deadline:
        follower.poll(timeout_ms=100)
        if first is None and follower.store is not None and len(follower.store) > 1:
            first = time.time() - t0
    elapsed = time.time() - t0
    cpu1 = cpu_seconds(pids)
    service_cores = cores_of(proc.pid)
    producer.join()
    proc.terminate()
    proc.wait(timeout=60)
    lat = np.array(follower.stats.latencies_s)
    done = len(follower.store) - 1 if follower.store else 0
    return {"crops": done, "seconds": elapsed, "crops_per_s": done / elapsed,
            "first_searchable_s": first,
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p95_s": float(np.percentile(lat, 95)),
            "cpu_core_seconds": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1 if k in cpu0},
            "cpu_core_seconds_available": round(elapsed * (os.cpu_count() or 1), 2),
            "embedding_service_cores": service_cores}


def layout(settings: Settings, crops: list, warmup, servers: dict[str, int],
           embedder_cores: set[int] | None) -> dict:
    """One layout's forward ceiling and end-to-end run, in a fresh namespace."""
    s = isolated(settings)
    forwards = (forward_ceiling_on(embedder_cores, s, crops) if embedder_cores
                else forward_ceiling(s, crops))
    e2e = end_to_end(s, crops, warmup, servers, embedder_cores)
    if embedder_cores and set(e2e["embedding_service_cores"]) != embedder_cores:
        raise RuntimeError(f"the embedding service ran on cores {e2e['embedding_service_cores']}"
                           f", not {sorted(embedder_cores)}: the layout was not measured")
    ratio = e2e["crops_per_s"] / forwards["ceiling"]
    return {"forward_crops_per_s_by_mode": forwards, "forward_crops_per_s": forwards["ceiling"],
            "end_to_end": e2e, "pipeline_vs_forward": ratio, "meets_target": ratio >= TARGET}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--crops", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest.json"))
    ap.add_argument("--forward-only", type=Path, help=argparse.SUPPRESS)  # the pinned child
    args = ap.parse_args()
    if args.forward_only:
        print(json.dumps(forward_ceiling(Settings(), pickle.loads(args.forward_only.read_bytes()))))
        return
    console = Console()
    base = Settings()
    stack = LocalStack(base)
    stack.up(ray=False)
    servers = {f"{name} server": pid for name, pid in stack.pids().items()}
    cpus = os.cpu_count() or 1

    with console.status(f"rendering {args.crops} synthetic crops (not timed)"):
        crops = render_crops(args.crops, args.seed)
        warmup = render_crops(1, args.seed + 1)[0]
    with console.status("shared cores: forward, then ingestor -> Kafka -> embedder -> FAISS"):
        shared = layout(base, crops, warmup, servers, None)
    own = None
    if cpus > 1:
        with console.status(f"embedder on core {cpus - 1}, the rest on the others: forward, "
                            "then end to end"):
            own = layout(base, crops, warmup, servers, {cpus - 1})
            own |= {"embedder_cores": [cpus - 1], "other_cores": list(range(cpus - 1))}
    forwards, e2e = shared["forward_crops_per_s_by_mode"], shared["end_to_end"]
    settings = base.embedder
    result = {
        "benchmark": "ingest", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": cpus, "platform": platform.platform()},
        "embedder": {"input": [settings.height, settings.width],
                     "batch": settings.batch_size, "forward_crops_per_s": forwards["ceiling"],
                     "forward_workers": settings.forward_workers,
                     "forward_threads": forward_threads(settings),
                     "forward_crops_per_s_by_mode": forwards},
        "end_to_end": e2e, "pipeline_vs_forward": shared["pipeline_vs_forward"],
        # against the reference as it was measured before the service ran batches side by side
        "pipeline_vs_one_forward_default_threads":
            e2e["crops_per_s"] / forwards["one_forward_default_threads"],
        "target_ratio": TARGET,
        "meets_target": shared["meets_target"],
        "own_core": own,
    }
    show(console, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


def show(console: Console, result: dict) -> None:
    forwards, e2e = result["embedder"]["forward_crops_per_s_by_mode"], result["end_to_end"]
    table = Table("measure", "value", title="ingest benchmark, all processes on all cores")
    table.add_row("forward, one at a time, default threads (crops/s)",
                  f"{forwards['one_forward_default_threads']:.1f}")
    table.add_row("forward as the service runs it (crops/s)",
                  f"{forwards['as_the_service_runs_it']:.1f}")
    table.add_row("forward as the service runs it, norms not folded (crops/s)",
                  f"{forwards['as_the_service_runs_it_norms_not_folded']:.1f}")
    table.add_row("embedder forward = the better folded one (crops/s)",
                  f"{forwards['ceiling']:.1f}")
    table.add_row("end to end sustained (crops/s)", f"{e2e['crops_per_s']:.1f}")
    table.add_row("pipeline / forward ceiling",
                  f"{result['pipeline_vs_forward']:.0%} (target ≥ {TARGET:.0%})")
    table.add_row("pipeline / one forward, default threads",
                  f"{result['pipeline_vs_one_forward_default_threads']:.0%}")
    table.add_row("capture→searchable p50 (s)", f"{e2e['latency_p50_s']:.2f}")
    table.add_row("capture→searchable p95 (s)", f"{e2e['latency_p95_s']:.2f}")
    console.print(table)
    own = result["own_core"]
    if own:
        t = Table("measure", "value", title=f"embedder on core(s) {own['embedder_cores']}, "
                  f"servers, ingestor and reader on {own['other_cores']}")
        t.add_row("forward ceiling on the embedder's core (crops/s)",
                  f"{own['forward_crops_per_s']:.1f}")
        t.add_row("end to end sustained (crops/s)", f"{own['end_to_end']['crops_per_s']:.1f}")
        t.add_row("pipeline / forward ceiling",
                  f"{own['pipeline_vs_forward']:.0%} (target ≥ {TARGET:.0%})")
        console.print(t)
    for name, run in (("all cores", result), ("own core", own)):
        if not run:
            continue
        run_e2e = run["end_to_end"]
        cpu = Table("process", "CPU core-seconds during the end-to-end run",
                    title=f"where the CPU went, {name} "
                    f"({run_e2e['cpu_core_seconds_available']} available)")
        for proc, sec in run_e2e["cpu_core_seconds"].items():
            cpu.add_row(proc, f"{sec:.1f}")
        console.print(cpu)


if __name__ == "__main__":
    main()
