"""Sharded prefilter benchmark: N shard processes (Ray actors, as Serve runs shard replicas)
each holding a compressed store of its part of the gallery, queried through the product's
fan-out and merge (``chatreid.prefilter.shards.ShardedStore``); plus the cost model of a
100M-crop, 1,000-camera site built from the measured figures.

Measured: build time (chunked adds as a follower does them, all shards building at once),
single-query latency of the merged search (k = 100) with every shard on this machine's cores,
each shard's latency when queried alone (what a shard on its own node would answer in), the
fan-out's own cost (a no-op call to every shard), recall@100 of the merged top 100 against
exact float search over all vectors (computed while generating, before any compression),
memory per shard (store bytes and process RSS) and the shards' balance.

Data: the prefilter benchmark's generator (``prefilter_search.ClusteredEmbeddings``, same
shape and seed rule), 512-d; each crop is also given one of ``--cameras`` site cameras
(``cam<row mod cameras>``), which is its Kafka key: its shard is the partition Kafka's default
partitioner gives that key (murmur2 mod ``--partitions``) mod the shard count, as in the
product. Queries are fresh crops of gallery identities.

    python benchmarks/prefilter_shards.py [--n 10000000] [--shards 4] [--queries 200]
        [--out benchmarks/results/prefilter_shards.json]
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import ray
from common import header, write
from kafka.partitioner.default import murmur2
from prefilter_search import ClusteredEmbeddings
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from chatreid.prefilter import PrefilterStore, VectorMeta
from chatreid.prefilter.shards import ShardedIndex

K = 100


@ray.remote
class ShardActor:
    """One shard: a compressed store and the product's shard API over it."""

    def __init__(self, index: int, dim: int, threads: int) -> None:
        import faiss

        from chatreid.prefilter.shards import ShardServer

        faiss.omp_set_num_threads(threads)
        self.store = PrefilterStore(dim, index_kind="compressed", partitions=threads)
        self.server = ShardServer(index, lambda: ("bench", self.store))
        self.build_s = 0.0

    def add(self, x: np.ndarray, metas: list[VectorMeta]) -> int:
        t0 = time.perf_counter()
        self.store.add(x, metas)
        self.build_s += time.perf_counter() - t0
        return len(self.store)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.server, method)(*args)

    def stats(self) -> dict:
        with open("/proc/self/status") as fh:
            rss = {k: float(v.split()[0]) / 1024 for k, v in
                   (line.split(":") for line in fh if line.startswith(("VmRSS", "VmHWM")))}
        return {"vectors": len(self.store), "store_bytes": self.store.memory_bytes(),
                "rss_mib": rss, "build_s": self.build_s, "index": self.store.index_info()}


class RayShard:
    """A :class:`~chatreid.prefilter.shards.ShardClient` over a Ray actor."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def call(self, method: str, *args: Any) -> Future:
        return self.actor.call.remote(method, *args).future()


def shard_of(camera: str, partitions: int, shards: int) -> int:
    """Kafka's default partitioner on the camera key, then the product's partition -> shard."""
    return ((murmur2(camera.encode()) & 0x7FFFFFFF) % partitions) % shards


class ExactTopK:
    """Running exact top-k (float cosines) of the queries over every vector generated."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.rows = np.zeros((len(queries), 0), np.int64)

    def add(self, x: np.ndarray, first_row: int) -> None:
        s = self.q @ x.T
        rows = np.broadcast_to(np.arange(first_row, first_row + len(x)), s.shape)
        scores = np.concatenate([self.scores, s], axis=1)
        allrows = np.concatenate([self.rows, rows], axis=1)
        keep = np.argpartition(-scores, min(self.k, scores.shape[1] - 1), axis=1)[:, : self.k]
        self.scores = np.take_along_axis(scores, keep, 1)
        self.rows = np.take_along_axis(allrows, keep, 1)


def build(args: argparse.Namespace, actors: list, console: Console) -> tuple[ExactTopK, dict]:
    gen = ClusteredEmbeddings(args.n, args.dim, args.seed)
    exact = ExactTopK(gen.queries(args.queries), K)
    owner = np.array([shard_of(f"cam{c:04d}", args.partitions, args.shards)
                      for c in range(args.cameras)])
    pending: list = []
    gen_s, t_start = 0.0, time.perf_counter()
    with tqdm(total=args.n, desc="build", unit="vec", unit_scale=True) as bar:
        t0 = time.perf_counter()
        for start, (x, metas, _) in zip(range(0, args.n, args.chunk), gen.gallery(args.chunk),
                                        strict=True):
            rows = np.arange(start, start + len(x))
            metas = [VectorMeta(crop_id=m.crop_id, camera=f"cam{r % args.cameras:04d}",
                                modality=m.modality, capture_time=m.capture_time, site=m.site)
                     for m, r in zip(metas, rows.tolist(), strict=True)]
            exact.add(x, start)
            gen_s += time.perf_counter() - t0
            ray.get(pending)  # one chunk in flight per shard bounds memory
            part = owner[rows % args.cameras]
            pending = [a.add.remote(x[part == i], [metas[j] for j in np.flatnonzero(part == i)])
                       for i, a in enumerate(actors)]
            bar.update(len(x))
            t0 = time.perf_counter()
        ray.get(pending)
    build_wall = time.perf_counter() - t_start
    console.log(f"built {args.n:,} vectors over {args.shards} shards in {build_wall:.0f} s "
                f"(data generation and exact truth {gen_s:.0f} s of it)")
    return exact, {"build_wall_s": build_wall, "data_and_truth_s": gen_s}


def timed(store, queries: np.ndarray) -> tuple[list, np.ndarray]:
    for q in queries[:10]:
        store.search(q, K)
    hits, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits.append(store.search(q, K)[0])
        lat.append(time.perf_counter() - t0)
    return hits, np.array(lat) * 1e3


def recall(hits: list, exact: ExactTopK) -> float:
    got = [{int(h.meta.crop_id[1:]) for h in row} for row in hits]
    return float(np.mean([len(g & set(e.tolist())) / K for g, e in zip(got, exact.rows,
                                                                        strict=True)]))


def fanout_ms(clients: list[RayShard], n: int = 200) -> np.ndarray:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        for f in [c.call("info") for c in clients]:
            f.result()
        lat.append(time.perf_counter() - t0)
    return np.array(lat) * 1e3


def measure(args: argparse.Namespace, actors: list, exact: ExactTopK,
            console: Console) -> dict:
    clients = [RayShard(a) for a in actors]
    index = ShardedIndex(clients, timeout_s=60)
    index.catch_up()
    store = index.active()[1]
    assert store is not None and len(store) == args.n
    hits, lat = timed(store, exact.q)
    alone = []
    for i, client in enumerate(clients):  # one shard queried, the others idle
        one = ShardedIndex([client], timeout_s=60)
        one.catch_up()
        single = one.active()[1]
        _, t = timed(single, exact.q)
        alone.append({"shard": i, "p50_ms": float(np.percentile(t, 50)),
                      "p95_ms": float(np.percentile(t, 95))})
    fan = fanout_ms(clients)
    stats = ray.get([a.stats.remote() for a in actors])
    return {
        "merged": {"p50_ms": float(np.percentile(lat, 50)),
                   "p95_ms": float(np.percentile(lat, 95)), "recall_at_100": recall(hits, exact)},
        "shard_alone": alone,
        "fanout_noop": {"p50_ms": float(np.percentile(fan, 50)),
                        "p95_ms": float(np.percentile(fan, 95))},
        "shards": [{"shard": i, "vectors": s["vectors"],
                    "store_bytes_per_vector": s["store_bytes"] / max(1, s["vectors"]),
                    "store_gib": s["store_bytes"] / 2**30, "rss_gib": s["rss_mib"]["VmRSS"] / 1024,
                    "peak_rss_gib": s["rss_mib"]["VmHWM"] / 1024, "build_s": s["build_s"],
                    "index": s["index"]} for i, s in enumerate(stats)],
    }


def cost_model(result: dict, args: argparse.Namespace) -> dict:
    """A 100M-crop, 1,000-camera site from the measured figures (the docs render it)."""
    shards = result["shards"]
    bpv = sum(s["store_bytes_per_vector"] * s["vectors"] for s in shards) / args.n
    overhead_gib = float(np.mean([s["rss_gib"] - s["store_gib"] for s in shards]))
    crops, budget = args.site_crops, args.shard_budget_gib * 2**30
    n_shards = math.ceil(crops * bpv / budget)
    partitions = args.site_partitions
    while partitions % n_shards:  # a divisor of the partitions keeps the shards even
        n_shards += 1
    per_shard = crops / n_shards
    slowest_alone = max(s["p50_ms"] for s in result["shard_alone"])
    per_shard_vectors = args.n / args.shards
    # an IVF with nlist ~ sqrt(n), probed to the same recall, scans ~sqrt(n) codes a query
    scaled = slowest_alone * math.sqrt(per_shard / per_shard_vectors)
    return {
        "site_crops": crops, "site_cameras": args.site_cameras,
        "indexed_partitions": partitions, "bytes_per_vector": bpv,
        "shard_memory_budget_gib": args.shard_budget_gib,
        "shards": n_shards, "vectors_per_shard": per_shard,
        "store_gib_per_shard": per_shard * bpv / 2**30,
        "process_overhead_gib": overhead_gib,
        "shard_pod_memory_gib": per_shard * bpv / 2**30 + overhead_gib,
        "shards_per_64gib_node": int(64 // (per_shard * bpv / 2**30 + overhead_gib + 2)),
        "query_p50_ms_estimate": scaled + result["fanout_noop"]["p50_ms"],
        "query_estimate_rule": "slowest shard alone at this run's shard size, scaled by "
                               "sqrt(vectors per shard) (IVF lists ~ sqrt(n)), plus the "
                               "measured fan-out cost; shards on their own cores",
        "settings": {"CHATREID_INDEX__KIND": "compressed",
                     "CHATREID_INDEX__SHARDS": str(n_shards),
                     "CHATREID_KAFKA__PARTITIONS": str(partitions)},
    }


def table(result: dict, args: argparse.Namespace) -> Table:
    t = Table(title=f"{args.n:,} x {args.dim}-d over {args.shards} shards, k = {K}")
    for col in ("shard", "vectors", "B/vector", "store GiB", "RSS GiB", "alone p50 ms"):
        t.add_column(col, justify="right")
    for s, a in zip(result["shards"], result["shard_alone"], strict=True):
        t.add_row(str(s["shard"]), f"{s['vectors']:,}", f"{s['store_bytes_per_vector']:.0f}",
                  f"{s['store_gib']:.2f}", f"{s['rss_gib']:.2f}", f"{a['p50_ms']:.1f}")
    m = result["merged"]
    t.caption = (f"merged p50 {m['p50_ms']:.1f} ms, p95 {m['p95_ms']:.1f} ms, recall@100 "
                 f"{m['recall_at_100']:.3f}; fan-out no-op p50 "
                 f"{result['fanout_noop']['p50_ms']:.2f} ms")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--partitions", type=int, default=24, help="of the indexed topic")
    p.add_argument("--cameras", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--chunk", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1, help="faiss threads per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site-crops", type=int, default=100_000_000)
    p.add_argument("--site-cameras", type=int, default=1000)
    p.add_argument("--site-partitions", type=int, default=24)
    p.add_argument("--shard-budget-gib", type=float, default=16.0,
                   help="index memory a shard may hold (cost model)")
    p.add_argument("--lock", default="/tmp/bench.lock",
                   help="flock(1) file timing runs share, so they never overlap")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefilter_shards.json"))
    args = p.parse_args()
    console = Console()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    actors = [ShardActor.options(num_cpus=0).remote(i, args.dim, args.threads)
              for i in range(args.shards)]
    exact, built = build(args, actors, console)
    with open(args.lock, "w") as lock:  # timings alone on the machine (other benchmarks wait)
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = {**built, **measure(args, actors, exact, console)}
    result["cost_model"] = cost_model(result, args)
    console.print(table(result, args))
    console.print(result["cost_model"])
    write(args.out, {**header("prefilter_shards", __doc__ or "", args), "result": result},
          console)
    ray.shutdown()


if __name__ == "__main__":
    main()
