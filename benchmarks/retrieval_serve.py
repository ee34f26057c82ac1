"""Retrieval on Ray Serve, end to end over HTTP: latency per query kind and K, VLM forward
passes per query, the served rerank against the plain path, throughput with 1 and 2 rerank
replicas, memory per replica.

The served rerank (prefix reuse, batched groups, the replica's vision cache, warm after the
latency sweep showed it the site's crops) and the plain path (``serve.reuse_prefix`` off: one
full forward per group, no cache) answer the same K = 20 requests; both must return the same
ranking (crop ids in order; largest confidence difference recorded).

Data: a synthetic site (the ingestor's synth source, seed 0) of ``--gallery`` crops streamed
through the real ingestor and embedding service into a fresh namespace (topics + bucket) of the
local stack; image queries are RGB crops of that site (visible-infrared ones search the
infrared crops), text and attribute queries are fixed phrases; no filters, so every query's
prefilter searches the whole gallery and the VLM reranks the top K.

    python benchmarks/retrieval_serve.py [--gallery 10000] [--ks 10 20 50] [--queries 3]
        [--kinds standard ...] [--model offline-default] [--concurrency 4]
        [--throughput-queries 8] [--no-throughput]
        [--out benchmarks/results/retrieval_serve.json]
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import build_site, header, namespace, write
from rich.console import Console
from rich.table import Table

from chatreid.client import RetrievalClient
from chatreid.config import Settings
from schemas import QueryRequest

KINDS = ("standard", "cloth_changing", "visible_infrared", "text_to_image", "attribute",
         "multimodal")
TEXTS = ("a man in a red top and black trousers", "a woman in a blue top with a backpack",
         "a person in a white top and grey trousers carrying a bag")
ATTRS = (["red top", "black trousers"], ["blue top", "backpack"], ["white top", "bag"])


def serve_namespace() -> Settings:
    s = namespace()
    s.ray.join_local_head, s.ray.num_cpus = False, 4  # logical CPUs: 2 replicas + the rest
    s.serve.http_port = 8021
    return s


def request_for(kind: str, i: int, k: int, rgb: list) -> QueryRequest:
    extra: dict = {}
    if kind in ("standard", "cloth_changing", "visible_infrared", "multimodal"):
        extra["crop_id"] = rgb[i % len(rgb)].crop_id
    if kind in ("text_to_image", "multimodal"):
        extra["text"] = TEXTS[i % len(TEXTS)]
    if kind == "attribute":
        extra["attributes"] = ATTRS[i % len(ATTRS)]
    return QueryRequest(kind=kind, k=k, top=k, **extra)


def timed(client: RetrievalClient, request: QueryRequest) -> tuple[float, int, int]:
    return answered(client, request)[:3]


def answered(client: RetrievalClient, request: QueryRequest
             ) -> tuple[float, int, int, list[tuple[str, float | None]]]:
    """(ms, VLM calls, candidates, [(crop id, confidence)] in rank order)."""
    t0 = time.perf_counter()
    response = client.query(request)
    ranking = [(r.crop_id, r.confidence) for r in response.results]
    return ((time.perf_counter() - t0) * 1000, response.vlm_calls, response.candidates,
            ranking)


def agreement(a: list[list[tuple[str, float | None]]], b: list[list[tuple[str, float | None]]]
              ) -> tuple[bool, float]:
    """Both rankings list the same crops in the same order; largest confidence difference."""
    same = all([c for c, _ in x] == [c for c, _ in y] for x, y in zip(a, b, strict=True))
    diffs = [abs(p - q) for x, y in zip(a, b, strict=True)
             for (_, p), (_, q) in zip(x, y, strict=False) if p is not None and q is not None]
    return same, max(diffs, default=0.0)


def pct(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(xs, 50)), "p95_ms": float(np.percentile(xs, 95)),
            "mean_ms": float(np.mean(xs))}


def replica_stats(settings: Settings, calls: int = 12) -> list[dict]:
    from ray import serve

    handle = serve.get_deployment_handle("Rerank", settings.serve.app_name)
    seen = {}
    for _ in range(calls):
        s = handle.stats.remote().result()
        seen[s["pid"]] = s
    return list(seen.values())


def latency(client, ks, kinds, queries, rgb, console) -> list[dict]:
    rows = []
    timed(client, request_for("standard", 0, ks[0], rgb))  # warm-up: caches, allocator
    for k in ks:
        for kind in kinds:
            runs = [timed(client, request_for(kind, i, k, rgb)) for i in range(queries)]
            ms = [r[0] for r in runs]
            rows.append({"kind": kind, "k": k, "queries": queries, **pct(ms),
                         "vlm_calls_per_query": float(np.mean([r[1] for r in runs])),
                         "candidates": float(np.mean([r[2] for r in runs]))})
            console.print(f"K={k:3d} {kind:17s} p50 {rows[-1]['p50_ms'] / 1000:6.2f}s "
                          f"p95 {rows[-1]['p95_ms'] / 1000:6.2f}s "
                          f"calls {rows[-1]['vlm_calls_per_query']:.0f}")
    return rows


def throughput(client, k, n, concurrency, rgb) -> dict:
    requests = [request_for("standard", i, k, rgb) for i in range(n)]
    lat: list[float] = []
    lock = threading.Lock()

    def one(r):
        ms = timed(client, r)[0]
        with lock:
            lat.append(ms)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    return {"queries": n, "concurrency": concurrency, "wall_s": wall,
            "queries_per_s": n / wall, **pct(lat)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", type=int, default=10_000)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--queries", type=int, default=3, help="queries per kind and K")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--no-throughput", action="store_true",
                   help="skip the 1- and 2-replica throughput runs")
    p.add_argument("--model", default="offline-default")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--throughput-queries", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval_serve.json"))
    args = p.parse_args()
    console = Console()

    from ray import serve

    from chatreid.cluster import connect
    from chatreid.query import ModelSpec
    from chatreid.storage import ObjectStore
    from services.retrieval.app import deploy

    settings = serve_namespace()
    report = header("retrieval_serve", __doc__, args, model=args.model)
    try:
        events = [event for event, _ in build_site(settings, args.gallery, console)]
        rgb = [e for e in events if e.modality == "rgb"]
        connect(settings)
        spec = ModelSpec.of_base(args.model)
        settings.serve.api_key = settings.serve.api_key or secrets.token_urlsafe(24)

        def redeploy(replicas: int, threads: int, reuse: bool = True) -> RetrievalClient:
            settings.serve.rerank_replicas, settings.serve.torch_threads = replicas, threads
            settings.serve.reuse_prefix = reuse
            t0 = time.perf_counter()
            deploy(settings, spec)
            client = RetrievalClient(settings.serve.base_url, timeout_s=600,
                                     api_key=settings.serve.api_key.get_secret_value())
            client.wait_ready(gallery=args.gallery, timeout_s=600)
            console.print(f"deployed {replicas} rerank replica(s) x {threads} thread(s), "
                          f"prefix reuse {reuse}: {time.perf_counter() - t0:.0f}s")
            return client

        client = redeploy(1, 2)
        report["latency"] = latency(client, args.ks, args.kinds, args.queries, rgb, console)
        report["replicas_1x2_threads"] = replica_stats(settings)

        k20 = [request_for("standard", i, 20, rgb) for i in range(args.queries)]
        served = [answered(client, r) for r in k20]
        report["vision_cache"] = [s.get("vision_cache") for s in replica_stats(settings)]
        client = redeploy(1, 2, reuse=False)
        plain = [answered(client, r) for r in k20]
        same, diff = agreement([r[3] for r in served], [r[3] for r in plain])
        with_reuse, without = [r[0] for r in served], [r[0] for r in plain]
        report["prefix_reuse_k20"] = {
            "with": pct(with_reuse), "without": pct(without),
            "vlm_calls": {"with": float(np.mean([r[1] for r in served])),
                          "without": float(np.mean([r[1] for r in plain]))},
            "same_ranking": same, "max_confidence_diff": diff,
            "speedup_p50": float(np.median(without) / np.median(with_reuse)), "target": 3.5}
        console.print(f"K=20 served vs plain: {report['prefix_reuse_k20']['speedup_p50']:.2f}x, "
                      f"same ranking {same}, max |dconfidence| {diff:.1e}")

        report["throughput"] = []
        for replicas, threads in () if args.no_throughput else ((1, 2), (2, 1)):
            client = redeploy(replicas, threads)
            timed(client, k20[0])
            row = throughput(client, 20, args.throughput_queries, args.concurrency, rgb)
            row.update(replicas=replicas, torch_threads=threads,
                       replica_memory=replica_stats(settings))
            report["throughput"].append(row)
            console.print(f"{replicas} replica(s): {row['queries_per_s']:.3f} queries/s, "
                          f"p50 {row['p50_ms'] / 1000:.1f}s")
    finally:
        serve.shutdown()
        ObjectStore(settings.s3).drop_bucket()
    show(report, console)
    write(args.out, report, console)


def show(report: dict, console: Console) -> None:
    table = Table("kind", "K", "p50 s", "p95 s", "VLM calls/query",
                  title=f"retrieval latency over HTTP - {report['args']['gallery']} crops, "
                        f"{report['args']['model']}")
    for r in report["latency"]:
        table.add_row(r["kind"], str(r["k"]), f"{r['p50_ms'] / 1000:.2f}",
                      f"{r['p95_ms'] / 1000:.2f}", f"{r['vlm_calls_per_query']:.0f}")
    console.print(table)
    pr = report["prefix_reuse_k20"]
    console.print(f"served rerank vs plain at K=20: {pr['without']['p50_ms'] / 1000:.2f}s -> "
                  f"{pr['with']['p50_ms'] / 1000:.2f}s p50 = {pr['speedup_p50']:.2f}x "
                  f"(target {pr['target']}x), same ranking {pr.get('same_ranking')}")
    t = Table("rerank replicas", "threads each", "queries/s", "p50 s", "p95 s",
              "peak RSS per replica (MiB)", title="throughput, K=20, concurrent clients")
    for r in report["throughput"]:
        t.add_row(str(r["replicas"]), str(r["torch_threads"]), f"{r['queries_per_s']:.3f}",
                  f"{r['p50_ms'] / 1000:.1f}", f"{r['p95_ms'] / 1000:.1f}",
                  ", ".join(f"{m['peak_rss_mb']:.0f}" for m in r["replica_memory"]))
    console.print(t)


if __name__ == "__main__":
    main()
