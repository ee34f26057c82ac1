"""Prefilter store benchmark: build time, single-query latency, recall@k and memory per vector.

For each gallery size the store is built the way a follower builds it (chunked ``add`` calls,
so flat->IVF migration, retraining and calibration are all inside the build time), then
single-query searches (k=100) are timed for the index kind the store picked, unfiltered and
with a metadata filter, and compared with exact search for recall@k.

Data: synthetic, shaped like pooled ReLU CNN features of person crops (not real embeddings).
``n / 16`` identities (so ~16 crops per person, Poisson-spread); per dimension j a power-law
scale s_j ~ (1 + rank_j)^-0.5 (most variance in few directions, like real features); a shared
positive mean m_j ~ |N(0, 1)| (all crops look alike to an ImageNet backbone); identity centre
c = m + s*N(0, 1); crop = relu(c + 0.7 s*N(0, 1) + camera bias 0.35 s*N(0, 1), 16 cameras),
L2-normalised. This gives mean cosine ~0.63 between different people and ~0.85 within a person
(recorded per run). Queries are fresh crops of gallery identities (never stored vectors).

    python benchmarks/prefilter_search.py [--sizes 10000 100000 1000000] [--dim 1280]
        [--queries 200] [--kinds auto] [--sweep] [--out benchmarks/results/prefilter_search.json]

``--sweep`` also times the approximate index at other nprobe/efSearch values than the one the
store calibrated; ``--kinds flat ivf hnsw compressed`` compares index kinds at the same sizes.
``--peers`` also measures plain FAISS configurations (``prefilter_peers.py``) on the same
vectors, queries and exact truth, and says whether the store's point is on their recall-latency
frontier (all peers, and peers within ``--budget-bytes`` per vector). Every row also reports
same-identity recall: of the query person's crops in the exact top k, the share returned.

The compressed 1M x 512-d run (issue 18's figures)::

    python benchmarks/prefilter_search.py --sizes 1000000 --dim 512 --kinds compressed \
        --peers --out benchmarks/results/prefilter_compressed_512.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from common import header, write
from prefilter_peers import measure_peers, on_frontier, peer_table, query_labels
from rich.console import Console
from rich.table import Table

from chatreid.prefilter import PrefilterStore, SearchFilter, VectorMeta

CAMERAS = 16
DAY_S = 86_400.0


@dataclass(frozen=True)
class DataConfig:
    crops_per_identity: int = 16
    identity_scale: float = 1.0
    noise_scale: float = 0.7
    camera_scale: float = 0.35
    mean_scale: float = 1.0
    span_s: float = 7 * DAY_S


class ClusteredEmbeddings:
    """Deterministic generator of identity-clustered, person-embedding-like unit vectors."""

    def __init__(self, n: int, dim: int, seed: int, cfg: DataConfig = DataConfig()) -> None:
        self.n, self.dim, self.seed, self.cfg = n, dim, seed, cfg
        rng = np.random.default_rng(seed)
        rank = rng.permutation(dim)
        spectrum = (1.0 + rank) ** -0.5
        self.scale = (spectrum * np.sqrt(dim) / np.linalg.norm(spectrum)).astype(np.float32)
        self.mean = (np.abs(rng.standard_normal(dim)) * cfg.mean_scale).astype(np.float32)
        self.identities = max(1, n // cfg.crops_per_identity)
        self.centres = self.mean + cfg.identity_scale * self.scale * rng.standard_normal(
            (self.identities, dim), dtype=np.float32)
        self.camera_bias = cfg.camera_scale * self.scale * rng.standard_normal(
            (CAMERAS, dim), dtype=np.float32)

    def _crops(self, rng: np.random.Generator, labels: np.ndarray,
               cameras: np.ndarray) -> np.ndarray:
        x = self.centres[labels]
        x += self.cfg.noise_scale * self.scale * rng.standard_normal(x.shape, dtype=np.float32)
        x += self.camera_bias[cameras]
        np.maximum(x, 0.0, out=x)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def gallery(self, chunk: int) -> Iterator[tuple[np.ndarray, list[VectorMeta], np.ndarray]]:
        """Chunks of (vectors, metas, identity labels)."""
        for start in range(0, self.n, chunk):
            rng = np.random.default_rng([self.seed, 0, start])
            size = min(chunk, self.n - start)
            labels = rng.integers(0, self.identities, size)
            cameras = rng.integers(0, CAMERAS, size)
            times = rng.uniform(0.0, self.cfg.span_s, size)
            infrared = rng.random(size) < 0.2
            metas = [VectorMeta(crop_id=f"g{start + i:08d}", camera=f"cam{c:02d}",
                                modality="infrared" if ir else "rgb", capture_time=float(t),
                                site="bench")
                     for i, (c, t, ir) in enumerate(zip(cameras.tolist(), times.tolist(),
                                                        infrared.tolist(), strict=True))]
            yield self._crops(rng, labels, cameras), metas, labels

    def queries(self, q: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1])
        labels = rng.integers(0, self.identities, q)
        return self._crops(rng, labels, rng.integers(0, CAMERAS, q))


def cosine_stats(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    i, j = rng.integers(0, len(x), (2, 4000))
    order = np.argsort(labels, kind="stable")
    same = np.flatnonzero(labels[order][1:] == labels[order][:-1])[:4000]
    return {"inter_identity_cos": float(np.mean(np.sum(x[i] * x[j], 1))),
            "intra_identity_cos": float(np.mean(np.sum(x[order[same]] * x[order[same + 1]], 1)))}


def _rows(hits: list) -> list[int]:
    return [int(h.meta.crop_id[1:]) for h in hits]  # crop ids are g<row>


def same_identity(approx: list, exact: list, labels: np.ndarray, q_labels: np.ndarray) -> float:
    """Of the query person's crops in the exact top k, the share the index returned."""
    per = []
    for a, e, person in zip(approx, exact, q_labels.tolist(), strict=True):
        wanted = {r for r in _rows(e) if labels[r] == person}
        if wanted:
            per.append(len(wanted & set(_rows(a))) / len(wanted))
    return float(np.mean(per)) if per else 1.0


def recall(approx: list, exact: list) -> float:
    per = [len({h.id for h in a} & {h.id for h in e}) / len(e)
           for a, e in zip(approx, exact, strict=True) if e]
    return float(np.mean(per)) if per else 1.0


def timed_single_queries(store: PrefilterStore, queries: np.ndarray, k: int,
                         filters: SearchFilter | None) -> tuple[list, np.ndarray]:
    for q in queries[:10]:  # warm caches and faiss thread pools
        store.search(q, k, filters=filters)
    hits, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits.append(store.search(q, k, filters=filters)[0])
        lat.append(time.perf_counter() - t0)
    return hits, np.array(lat) * 1e3


def knob_sweep(store: PrefilterStore, queries: np.ndarray, exact: list,
               args: argparse.Namespace) -> list[dict]:
    """Latency and recall at other nprobe/efSearch values than the calibrated one."""
    info = store.index_info()
    if info["kind"] == "flat":
        return []
    knobs = args.sweep_knobs or ([16, 64, 256, 1024] if info["kind"] == "ivf"
                                 else [128, 256, 384, 512, 768] if info["kind"] == "compressed"
                                 else [200, 400, 800, 1200, 2048])
    out = []
    for knob in knobs:
        store.set_search_knob(knob)
        hits, lat = timed_single_queries(store, queries, args.k, None)
        out.append({"knob": knob, "p50_ms": float(np.percentile(lat, 50)),
                    "p95_ms": float(np.percentile(lat, 95)), "recall_at_k": recall(hits, exact)})
    store.set_search_knob(info["knob"])
    return out


def rss_mib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = float(value.split()[0]) / 1024
    return out


def bench(n: int, kind: str, args: argparse.Namespace, console: Console) -> dict:
    gen = ClusteredEmbeddings(n, args.dim, args.seed)
    store = PrefilterStore(args.dim, index_kind=kind, exact_max=args.exact_max)
    build_s = gen_s = 0.0
    stats: dict[str, float] = {}
    all_labels = []
    t_gen = time.perf_counter()
    for x, metas, labels in gen.gallery(args.chunk):
        all_labels.append(labels)
        if not stats:
            stats = cosine_stats(x, labels, np.random.default_rng(0))
        t0 = time.perf_counter()
        gen_s += t0 - t_gen
        store.add(x, metas)
        t_gen = time.perf_counter()
        build_s += t_gen - t0
    del x, metas
    info = store.index_info()
    console.log(f"n={n:,} kind={kind}: built {info} in {build_s:.1f}s (+{gen_s:.1f}s data)")

    queries = gen.queries(args.queries)
    hits, lat = timed_single_queries(store, queries, args.k, None)
    t0 = time.perf_counter()
    store.search(queries, args.k)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    exact = store.search(queries, args.k, exact=True)
    exact_batch_s = time.perf_counter() - t0

    # ~12% of the gallery: 4 of 16 cameras in the second half of the week
    filt = SearchFilter(cameras=frozenset(f"cam{c:02d}" for c in range(4)),
                        time_from=gen.cfg.span_s / 2)
    f_hits, f_lat = timed_single_queries(store, queries, args.k, filt)
    f_exact = store.search(queries, args.k, filters=filt, exact=True)

    gallery_labels, q_labels = np.concatenate(all_labels), query_labels(gen, len(queries))
    sweep = knob_sweep(store, queries, exact, args) if args.sweep else []
    mem = store.memory_bytes()
    row = {
        "n": n, "dim": args.dim, "k": args.k, "queries": len(queries), "requested_kind": kind,
        "index": info, "build_s": build_s, "data_gen_s": gen_s,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "mean_ms": float(lat.mean()), "recall_at_k": recall(hits, exact),
        "same_identity_recall": same_identity(hits, exact, gallery_labels, q_labels),
        "batch_qps": batch_qps, "exact_batch_qps": len(queries) / exact_batch_s,
        "filtered_p50_ms": float(np.percentile(f_lat, 50)),
        "filtered_p95_ms": float(np.percentile(f_lat, 95)),
        "filtered_recall_at_k": recall(f_hits, f_exact),
        "memory_bytes_per_vector": mem / len(store),
        "vector_bytes_per_vector": args.dim * 4, "rss_mib": rss_mib(), "data": stats,
        "knob_sweep": sweep,
    }
    console.log(json.dumps({k: v for k, v in row.items() if k not in ("index", "rss_mib")}))
    if args.peers:
        del store
        row["peers"] = peers(gen, queries, exact, gallery_labels, q_labels, args, console)
        point = {"p50_ms": row["p50_ms"], "recall_at_k": row["recall_at_k"]}
        within = [p for p in row["peers"]
                  if "skipped" in p or p["bytes_per_vector"] <= args.budget_bytes]
        row["frontier"] = {"all_peers": on_frontier(point, row["peers"]),
                           "within_budget": on_frontier(point, within),
                           "budget_bytes": args.budget_bytes}
        console.log(f"on the frontier of all peers: {row['frontier']['all_peers']['on_frontier']};"
                    f" of peers within {args.budget_bytes} B/vector: "
                    f"{row['frontier']['within_budget']['on_frontier']}")
    return row


def peers(gen: ClusteredEmbeddings, queries: np.ndarray, exact: list, labels: np.ndarray,
          q_labels: np.ndarray, args: argparse.Namespace, console: Console) -> list[dict]:
    """Plain FAISS on the same vectors (regenerated: the generator is deterministic)."""
    xb = np.concatenate([x for x, _, _ in gen.gallery(args.chunk)])
    truth = np.array([_rows(e) for e in exact], np.int64)
    rows = measure_peers(xb, queries, truth, k=args.k, query_labels=q_labels,
                         gallery_labels=labels, console=console,
                         max_build_n=args.peers_max_build_n)
    console.print(peer_table(rows, f"plain FAISS peers, {len(xb):,} x {xb.shape[1]}, "
                                   f"single query, k={args.k}"))
    return rows


def table(rows: list[dict]) -> Table:
    t = Table(title="prefilter store: single-query search, k=100, this machine")
    for col in ("n", "dim", "index", "build s", "p50 ms", "p95 ms", "recall@k", "filt p50",
                "filt recall", "batch q/s", "B/vector"):
        t.add_column(col, justify="right")
    for r in rows:
        i = r["index"]
        kind = i["kind"] + (f" nlist={i['nlist']} nprobe={i['knob']}" if "nlist" in i
                            else f" ef={i['knob']}" if i["knob"] else "")
        t.add_row(f"{r['n']:,}", str(r["dim"]), kind, f"{r['build_s']:.1f}",
                  f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['recall_at_k']:.3f}",
                  f"{r['filtered_p50_ms']:.2f}", f"{r['filtered_recall_at_k']:.3f}",
                  f"{r['batch_qps']:.0f}", f"{r['memory_bytes_per_vector']:.0f}")
    return t


def sweep_table(rows: list[dict]) -> Table:
    t = Table(title="approximate index: recall vs latency by search knob (single query, k=100)")
    for col in ("n", "dim", "index", "knob", "p50 ms", "p95 ms", "recall@k"):
        t.add_column(col, justify="right")
    for r in rows:
        for s in r["knob_sweep"]:
            t.add_row(f"{r['n']:,}", str(r["dim"]), r["index"]["kind"], str(s["knob"]),
                      f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['recall_at_k']:.3f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--kinds", nargs="+", default=["auto"],
                    choices=["auto", "flat", "ivf", "hnsw", "compressed"],
                    help="index kinds to compare")
    ap.add_argument("--exact-max", type=int, default=None,
                    help="store's flat/approximate threshold (default: the store's, by dim)")
    ap.add_argument("--chunk", type=int, default=50_000, help="vectors per add() call")
    ap.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the approximate index at other nprobe/efSearch values")
    ap.add_argument("--sweep-knobs", type=int, nargs="+", default=None)
    ap.add_argument("--peers", action="store_true",
                    help="also measure plain FAISS configurations on the same data")
    ap.add_argument("--peers-max-build-n", type=int, default=None,
                    help="skip HNSW peers above this many vectors (their build is slow)")
    ap.add_argument("--budget-bytes", type=int, default=1024,
                    help="memory budget per vector for the within-budget frontier check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prefilter_search.json"))
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # piped to a log: do not squeeze the table into 80 columns
        console = Console(width=160)
    rows = []
    for n in args.sizes:
        for kind in args.kinds:
            rows.append(bench(n, kind, args, console))
    console.print(table(rows))
    if any(r["knob_sweep"] for r in rows):
        console.print(sweep_table(rows))
    report = header("prefilter_search", __doc__, args, faiss_threads=args.threads,
                    faiss=faiss.__version__, numpy=np.__version__, gpus=faiss.get_num_gpus())
    report["data_config"] = DataConfig().__dict__
    report["results"] = rows
    write(args.out, report, console)

if __name__ == "__main__":
    main()
