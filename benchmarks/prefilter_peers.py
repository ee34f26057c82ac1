"""Plain-FAISS peers of the prefilter store: recall@k against single-query latency, per config.

The prefilter benchmark (``prefilter_search.py``) times the project's own index; this module
times off-the-shelf FAISS configurations (``faiss.index_factory`` strings, no project code) on
the same vectors, queries and exact truth, so the benchmark can print a peer table and check
that the project's index sits on the recall-latency frontier (``on_frontier``: no peer is both
faster and more accurate). For each config it measures, once, the build time (train + add) and
the serialized size per vector; then for each point of its search-knob sweep (efSearch, nprobe,
refine k_factor) the single-query latency (one query per ``search`` call, p50/p95 after 10
warm-up queries), recall@k against exact top-k by cosine, and, with identity labels,
same-identity recall: of the exact top-k rows that show the query's person, the share returned.

Every peer is built with the L2 metric. The vectors are unit-norm, so ranking by L2 distance is
ranking by cosine (|a - b|^2 = 2 - 2 cos) and recall is unaffected; but L2 lets IVF and PQ
quantise residuals around the data's large shared mean (all crops look alike to an ImageNet
backbone), where inner-product PQ loses most of its resolution to that mean.

Data: the prefilter benchmark's synthetic person-embedding-like vectors
(``prefilter_search.ClusteredEmbeddings``: n / 16 identities, power-law per-dimension scales,
shared positive mean, camera bias, ReLU, L2-normalised); queries are fresh crops of gallery
identities; exact truth by ``faiss.IndexFlatIP``.

    python benchmarks/prefilter_peers.py [--n 100000] [--dim 512] [--queries 200] [--k 100]
        [--configs 'HNSW32,Flat' ...] [--max-build-n N] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

ADD_CHUNK = 100_000  # rows per index.add call (xb may be a memmap)
TRAIN_MAX = 160_000  # rows of the deterministic training sample
EF_SEARCH = (128, 256, 512, 1024)
EF_CONSTRUCTION = 40
WARMUP = 10

# The default peers and their knob sweeps; configs not listed here get default_knobs().
DEFAULT_CONFIGS: dict[str, list[dict[str, int]]] = {
    "HNSW32,Flat": [{"efSearch": ef} for ef in EF_SEARCH],
    "HNSW32_SQ8": [{"efSearch": ef} for ef in EF_SEARCH],
    "IVF1024,Flat": [{"nprobe": p} for p in (64, 128, 256, 512)],
    "IVF1024,SQ8": [{"nprobe": p} for p in (64, 128, 256, 512)],
    "IVF1024,PQ128x4fs,Refine(SQ8)": [{"nprobe": p, "k_factor": kf}
                                      for p in (128, 256, 384, 512) for kf in (16, 32)],
    "IVF1024,PQ128x4fs,Refine(Flat)": [{"nprobe": p, "k_factor": 16} for p in (256, 512)],
}


def default_knobs(config: str) -> list[dict[str, int]]:
    """The sweep for ``config``: the listed one for a default peer; otherwise efSearch 128..1024
    for HNSW, nprobe nlist/16..nlist/2 for IVF, times refine k_factor 16 for a Refine/RFlat
    wrapper; one knob-less point for anything else (e.g. ``Flat``)."""
    if config in DEFAULT_CONFIGS:
        return [dict(k) for k in DEFAULT_CONFIGS[config]]
    if (m := re.search(r"IVF(\d+)", config)) is not None:
        nlist = int(m.group(1))
        knobs = [{"nprobe": p} for p in sorted({max(1, nlist // f) for f in (16, 8, 4, 2)})]
    elif "HNSW" in config:
        knobs = [{"efSearch": ef} for ef in EF_SEARCH]
    else:
        knobs = [{}]
    if "Refine" in config or "RFlat" in config:
        knobs = [{**k, "k_factor": 16} for k in knobs]
    return knobs


def query_labels(gen: Any, q: int) -> np.ndarray:
    """Identity labels of ``gen.queries(q)`` (a ``prefilter_search.ClusteredEmbeddings``): the
    first draw of the same generator ``queries`` uses."""
    return np.random.default_rng([gen.seed, 1]).integers(0, gen.identities, q)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """|found ∩ truth| / k per query, averaged; ``found`` and ``truth`` are (q, k) row ids."""
    k = truth.shape[1]
    return float(np.mean([np.isin(t, f).sum() / k for f, t in zip(found, truth, strict=True)]))


def same_identity_recall(found: np.ndarray, truth: np.ndarray, query_labels: np.ndarray,
                         gallery_labels: np.ndarray) -> float | None:
    """Of each query's exact top-k rows whose gallery label is the query's label, the share the
    index returned; averaged over queries with at least one such row (None if none has)."""
    shares = []
    for f, t, label in zip(found, truth, query_labels, strict=True):
        same = t[gallery_labels[t] == label]
        if len(same):
            shares.append(np.isin(same, f).mean())
    return float(np.mean(shares)) if shares else None


def serialized_bytes(index: faiss.Index) -> int:
    """``len(faiss.serialize_index(index))``, counted as it streams (no copy of the index)."""
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def knob_label(knob: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in knob.items()) or "-"


def _search_params(knob: Mapping[str, int]) -> tuple[faiss.SearchParameters | None, list]:
    """SearchParameters for ``knob`` and the objects they point to (kept alive by the caller:
    a refine wrapper's ``base_index_params`` is a raw pointer)."""
    if "efSearch" in knob:
        base = faiss.SearchParametersHNSW(efSearch=int(knob["efSearch"]))
    elif "nprobe" in knob:
        base = faiss.SearchParametersIVF(nprobe=int(knob["nprobe"]))
    else:
        base = None
    if "k_factor" not in knob:
        return base, [base]
    kf = float(knob["k_factor"])
    params = (faiss.IndexRefineSearchParameters(k_factor=kf) if base is None else
              faiss.IndexRefineSearchParameters(k_factor=kf, base_index_params=base))
    return params, [params, base]


def _set_ef_construction(index: faiss.Index, ef: int) -> None:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efConstruction = ef


def _train_sample(xb: np.ndarray) -> np.ndarray:
    n = len(xb)
    if n <= TRAIN_MAX:
        return np.ascontiguousarray(xb, dtype=np.float32)
    rows = np.sort(np.random.default_rng(0).choice(n, TRAIN_MAX, replace=False))
    return np.ascontiguousarray(xb[rows], dtype=np.float32)


def _timed_search(index: faiss.Index, queries: np.ndarray, k: int,
                  params: faiss.SearchParameters | None) -> tuple[np.ndarray, np.ndarray]:
    for q in queries[:WARMUP]:
        index.search(q[None], k, params=params)
    found = np.empty((len(queries), k), dtype=np.int64)
    lat = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        _, ids = index.search(q[None], k, params=params)
        lat[i] = time.perf_counter() - t0
        found[i] = ids[0]
    return found, lat * 1e3


def measure_peers(xb: np.ndarray, queries: np.ndarray, truth: np.ndarray, *, k: int = 100,
                  query_labels: np.ndarray | None = None,
                  gallery_labels: np.ndarray | None = None,
                  configs: Sequence[str] | None = None, console: Console | None = None,
                  max_build_n: int | None = None,
                  knobs: Mapping[str, Sequence[Mapping[str, int]]] | None = None) -> list[dict]:
    """One row per (config, knob) point, plus ``{"config", "skipped": reason}`` rows.

    ``xb`` (n, d) float32 unit rows (a memmap is fine: added in chunks of 100k); ``queries``
    (q, d) unit rows; ``truth`` (q, >=k) exact top-k row ids by cosine. ``configs`` are
    ``faiss.index_factory`` strings (default: ``DEFAULT_CONFIGS``); ``knobs`` overrides a
    config's sweep (default ``default_knobs``). HNSW configs are skipped when n > ``max_build_n``.
    """
    n, d = xb.shape
    truth = np.asarray(truth)[:, :k]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    labelled = query_labels is not None and gallery_labels is not None
    log = console.log if console is not None else (lambda *a, **kw: None)
    sample: np.ndarray | None = None
    rows: list[dict] = []
    if configs is None:  # the PQ peers use d/4 sub-quantisers (4 dims each) at any d
        pq = f"PQ{d // 4}x4fs"
        configs = [c.replace("PQ128x4fs", pq) for c in DEFAULT_CONFIGS]
        knobs = {**{c.replace("PQ128x4fs", pq): v for c, v in DEFAULT_CONFIGS.items()},
                 **(knobs or {})}
    for config in configs:
        if "HNSW" in config and max_build_n is not None and n > max_build_n:
            reason = f"HNSW build skipped: n={n:,} > max_build_n={max_build_n:,}"
            log(f"{config}: {reason}")
            rows.append({"config": config, "skipped": reason})
            continue
        index = faiss.index_factory(d, config, faiss.METRIC_L2)
        _set_ef_construction(index, EF_CONSTRUCTION)
        t0 = time.perf_counter()
        if not index.is_trained:
            if sample is None:
                sample = _train_sample(xb)
            index.train(sample)
        for start in range(0, n, ADD_CHUNK):
            index.add(np.ascontiguousarray(xb[start:start + ADD_CHUNK], dtype=np.float32))
        build_s = time.perf_counter() - t0
        bytes_per_vector = serialized_bytes(index) / n
        log(f"{config}: built in {build_s:.1f}s, {bytes_per_vector:.0f} B/vector")
        sweep = knobs[config] if knobs is not None and config in knobs else default_knobs(config)
        for knob in sweep:
            params, _keep = _search_params(knob)
            found, lat = _timed_search(index, queries, k, params)
            row = {
                "config": config, "knob": {key: int(v) for key, v in knob.items()},
                "build_s": build_s, "bytes_per_vector": bytes_per_vector,
                "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "recall_at_k": recall_at_k(found, truth),
                "same_identity_recall": (same_identity_recall(found, truth, query_labels,
                                                              gallery_labels)
                                         if labelled else None),
            }
            rows.append(row)
            same = row["same_identity_recall"]
            log(f"  {config} {knob_label(knob)}: p50 {row['p50_ms']:.2f} ms, "
                f"p95 {row['p95_ms']:.2f} ms, recall@{k} {row['recall_at_k']:.3f}"
                + (f", same-id {same:.3f}" if same is not None else ""))
        del index
        gc.collect()
    return rows


def peer_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("config", "knob", "build s", "B/vector", "p50 ms", "p95 ms", "recall@k",
                "same-id recall"):
        t.add_column(col, justify="left" if col in ("config", "knob") else "right")
    previous = None
    for r in rows:
        if "skipped" in r:
            t.add_row(r["config"], f"skipped: {r['skipped']}", *["-"] * 6)
            previous = None
            continue
        first = r["config"] != previous  # build figures once per config
        previous = r["config"]
        same = r.get("same_identity_recall")
        t.add_row(r["config"] if first else "", knob_label(r["knob"]),
                  f"{r['build_s']:.1f}" if first else "",
                  f"{r['bytes_per_vector']:.0f}" if first else "",
                  f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['recall_at_k']:.3f}",
                  f"{same:.3f}" if same is not None else "-")
    return t


def on_frontier(point: dict, peers: list[dict], *, tolerance: float = 0.0) -> dict:
    """Peers that dominate ``point``: strictly faster (p50) AND recall@k higher by more than
    ``tolerance``. ``on_frontier`` is True when there is none. Skipped rows are ignored."""
    dominated_by = [
        {"config": p["config"], "knob": p["knob"], "p50_ms": p["p50_ms"],
         "recall_at_k": p["recall_at_k"]}
        for p in peers
        if "skipped" not in p and p["p50_ms"] < point["p50_ms"]
        and p["recall_at_k"] > point["recall_at_k"] + tolerance
    ]
    return {"dominated_by": dominated_by, "on_frontier": not dominated_by}


def main() -> None:
    # Imported here, not at the top: prefilter_search imports this module.
    from common import header, write
    from prefilter_search import ClusteredEmbeddings, DataConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--configs", nargs="+", default=None,
                    help="faiss.index_factory strings (default: the six standard peers)")
    ap.add_argument("--max-build-n", type=int, default=None,
                    help="skip HNSW configs for galleries larger than this")
    ap.add_argument("--chunk", type=int, default=ADD_CHUNK, help="rows per generated chunk")
    ap.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # piped to a log: do not squeeze the table into 80 columns
        console = Console(width=160)
    t_all = time.perf_counter()

    gen = ClusteredEmbeddings(args.n, args.dim, args.seed)
    xb = np.empty((args.n, args.dim), dtype=np.float32)
    gallery_labels = np.empty(args.n, dtype=np.int64)
    for start, (x, _metas, labels) in zip(range(0, args.n, args.chunk),
                                         gen.gallery(args.chunk), strict=True):
        xb[start:start + len(x)] = x
        gallery_labels[start:start + len(x)] = labels
    queries = gen.queries(args.queries)
    q_labels = query_labels(gen, args.queries)
    data_s = time.perf_counter() - t_all

    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(xb)
    _, truth = exact.search(queries, args.k)
    del exact
    truth_s = time.perf_counter() - t0
    console.log(f"data {data_s:.1f}s, exact truth {truth_s:.1f}s "
                f"(n={args.n:,}, dim={args.dim}, queries={args.queries})")

    rows = measure_peers(xb, queries, truth, k=args.k, query_labels=q_labels,
                         gallery_labels=gallery_labels, configs=args.configs, console=console,
                         max_build_n=args.max_build_n)
    console.print(peer_table(rows, f"plain FAISS peers (L2): n={args.n:,}, dim={args.dim}, "
                                   f"single-query search, k={args.k}, this machine"))
    wall_s = time.perf_counter() - t_all
    console.log(f"wall {wall_s:.0f}s")
    if args.out is not None:
        report = header("prefilter_peers", __doc__, args, faiss_threads=args.threads,
                        faiss=faiss.__version__, numpy=np.__version__)
        report["data_config"] = DataConfig().__dict__
        report["timing_s"] = {"data": data_s, "truth": truth_s, "wall": wall_s}
        report["results"] = rows
        write(args.out, report, console)


if __name__ == "__main__":
    main()
