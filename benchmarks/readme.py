"""Render the documentation's figures from the measurements, so prose never drifts from them:
each ``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->`` block in README.md, docs/*.md and
benchmarks/README.md is written by the renderer ``NAME`` from its JSON (``BLOCKS``: usually
``benchmarks/results/NAME.json``; the evaluation suite's ``docs/eval/results.json``).

    python benchmarks/readme.py          # rewrite every block
    python benchmarks/readme.py --check  # exit 1 naming each stale block (tested in CI)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
Report = dict[str, Any]


def documents(root: Path = ROOT) -> list[Path]:
    """Every Markdown file whose figures this script owns."""
    return [root / "README.md", root / "benchmarks" / "README.md",
            root / "deploy" / "README.md", *sorted((root / "docs").glob("*.md"))]


# --- small formatting helpers -------------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def _s(ms: float) -> str:
    return f"{ms / 1000:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    head = list(header)
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _when(report: Report) -> str:
    return str(report.get("created_at") or report.get("date") or report.get("when"))


def _measured(report: Report, section: str) -> str:
    """When one section of a report that is measured in parts was last measured."""
    return str((report.get("measured") or {}).get(section) or _when(report))


def _cpus(report: Report) -> str:
    machine = report.get("machine")
    if isinstance(machine, dict):
        return f"{machine.get('cpus')} cores"
    return str(machine)


def _span(values: list[float]) -> str:
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return low if low == high else f"{low}–{high}"


def _verdict(met: bool, what: str) -> str:
    return f"**{what}: met**" if met else f"**{what}: not met**"


# --- ingest -------------------------------------------------------------------------------------

def ingest(report: Report) -> str:
    """``benchmarks/ingest.py``: the pipeline's sustained rate against the embedder's forward."""
    e2e, fwd, own = report["end_to_end"], report["embedder"], report.get("own_core")
    ratio, target = report["pipeline_vs_forward"], report["target_ratio"]
    modes = fwd.get("forward_crops_per_s_by_mode")
    alone = [
        ["embedder decode + forward alone, one batch at a time (torch's default threads)",
         f"{modes['one_forward_default_threads']:.0f} crops/s"],
        [f"embedder decode + forward alone, as the service runs it ({fwd['forward_workers']} "
         f"batches at once, {fwd['forward_threads']} torch "
         f"thread{'s' if fwd['forward_threads'] != 1 else ''} each)",
         f"{modes['as_the_service_runs_it']:.0f} crops/s"],
        *([["the same, the network as trained (BatchNorms not folded into the convolutions)",
             f"{modes['as_the_service_runs_it_norms_not_folded']:.0f} crops/s"]]
          if "as_the_service_runs_it_norms_not_folded" in modes else []),
        ["forward ceiling (the better of the first two)",
         f"{fwd['forward_crops_per_s']:.0f} crops/s"],
    ] if modes else [["embedder decode + forward alone", f"{fwd['forward_crops_per_s']:.0f} "
                      "crops/s"]]
    rows = _table(["measure", "value"], [
        *alone,
        ["end to end, sustained", f"{e2e['crops_per_s']:.1f} crops/s"],
        ["pipeline / forward ceiling", f"{ratio:.0%} (target {target:.0%})"],
        *([["pipeline / one batch at a time (the reference before the service ran two)",
            f"{report['pipeline_vs_one_forward_default_threads']:.0%}"]]
          if "pipeline_vs_one_forward_default_threads" in report else []),
        ["capture → searchable p50 / p95",
         f"{e2e['latency_p50_s']:.1f} s / {e2e['latency_p95_s']:.1f} s"],
        *_own_core_rows(own, target),
    ])
    cpu = ", ".join(f"{k} {v:g}" for k, v in e2e["cpu_core_seconds"].items())
    h, w = fwd["input"]
    as_trained = (modes or {}).get("as_the_service_runs_it_norms_not_folded")
    folding = (f" Folding the BatchNorms makes the service's forward "
               f"{modes['as_the_service_runs_it'] / as_trained:.1f}× faster (same vectors)."
               if modes and as_trained else "")
    verdict = _verdict(report["meets_target"], "pipeline ≥ target × forward, all on the same "
                       "cores") + (". " + _verdict(own["meets_target"], "with the embedder on a "
                                   "core of its own") if own else "")
    own_cpu = (" With the embedder on its own core: " + ", ".join(
        f"{k} {v:g}" for k, v in own["end_to_end"]["cpu_core_seconds"].items())
        + f" ({own['end_to_end']['cpu_core_seconds_available']:g} available)." if own else "")
    return "\n".join(rows) + (
        f"\n\n{verdict}. "
        f"Core-seconds used during the run ({e2e['cpu_core_seconds_available']:g} available): "
        f"{cpu}.{_cpu_bound(report)}{own_cpu}{folding}\n\n{e2e['crops']:,} crops of {h}×{w}, "
        f"batch {fwd['batch']}, "
        f"{_cpus(report)}; measured {_when(report)}.")


def _cpu_bound(report: Report) -> str:
    """All on the same cores, the most the pipeline can reach: the forward's share of the
    core-seconds the whole run used (the forward ceiling keeps every core busy)."""
    e2e, fwd = report["end_to_end"], report["embedder"]
    used = sum(e2e["cpu_core_seconds"].values())
    forward = e2e["crops"] * report["machine"]["cpus"] / fwd["forward_crops_per_s"]
    return (f" The forward alone needs {forward:.1f} of the {used:.1f} core-seconds used, so on "
            f"these cores the pipeline can reach at most {forward / used:.0%} of it: the rest is "
            "the servers', ingestor's, reader's and service's own work on the same cores.")


def _own_core_rows(own: dict | None, target: float) -> list[list[str]]:
    """The same run's second layout: the embedding service and its forward reference pinned to
    a core of their own, the servers, ingestor and reader on the rest."""
    if not own:
        return []
    cores = ", ".join(str(c) for c in own["embedder_cores"])
    where = f"embedder alone on core {cores}, the rest on the other core(s)"
    return [
        [f"{where}: forward ceiling there", f"{own['forward_crops_per_s']:.0f} crops/s"],
        [f"{where}: end to end, sustained", f"{own['end_to_end']['crops_per_s']:.1f} crops/s"],
        [f"{where}: pipeline / forward ceiling",
         f"{own['pipeline_vs_forward']:.0%} (target {target:.0%})"],
    ]


# --- prefilter search ---------------------------------------------------------------------------

def _index(r: Report) -> str:
    idx = r["index"]
    return "exact (flat)" if idx["kind"] == "flat" else f"{idx['kind'].upper()}, ef {idx['knob']}"


def prefilter_search(*reports: Report) -> str:
    """``benchmarks/prefilter_search.py`` (the 1280-d run and the 256-d one): one row per size,
    then each approximate size's knob sweep."""
    runs = [r for report in reports for r in report["results"]]
    rows = _table(
        ["gallery", "index (chosen by size)", "build", "p50 / p95", "recall@k vs exact",
         "filtered recall", "memory / vector"],
        [[f"{r['n']:,} × {r['dim']}", _index(r), f"{r['build_s']:.1f} s",
          f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} ms", f"{r['recall_at_k']:.3f}",
          f"{r['filtered_recall_at_k']:.3f}", f"{r['memory_bytes_per_vector']:,.0f} B"]
         for r in runs])
    sweeps = []
    for r in runs:
        if r.get("knob_sweep"):
            steps = "; ".join(f"ef {s['knob']}: {s['recall_at_k']:.3f} at {s['p50_ms']:.1f} ms"
                              for s in r["knob_sweep"])
            sweeps.append(f"- {r['n']:,} × {r['dim']}: {steps}")
    first = reports[0]
    note = (f"k = {first['args']['k']}, {first['args']['queries']} single queries, "
            f"{first['machine']['faiss_threads']} FAISS threads, faiss "
            f"{first['machine']['faiss']}, {_cpus(first)}; measured "
            + ", ".join(_when(r) for r in reports))
    return ("\n".join(rows) + "\n\nRecall against p50 per HNSW search depth (ef):\n\n"
            + "\n".join(sweeps) + f"\n\n{note}.")


def _knob(knob: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in knob.items()) or "-"


def prefilter_compressed(report: Report) -> str:
    """``prefilter_search.py --kinds compressed --peers``: the store's compressed index at 1M,
    its knob sweep, the plain FAISS peers measured in the same run and the frontier verdict."""
    r = report["results"][0]
    idx = r["index"]
    rows = _table(
        ["gallery", "index", "build", "p50 / p95", "recall@100", "same-identity recall",
         "filtered p50 / recall", "memory / vector"],
        [[f"{r['n']:,} × {r['dim']}",
          f"compressed: SQ8 + IVF{idx['nlist']}-PQ4 × {idx['partitions']} partitions, "
          f"nprobe {idx['knob']}",
          f"{r['build_s']:.0f} s", f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} ms",
          f"{r['recall_at_k']:.3f}", f"{r['same_identity_recall']:.3f}",
          f"{r['filtered_p50_ms']:.1f} ms / {r['filtered_recall_at_k']:.3f}",
          f"{r['memory_bytes_per_vector']:,.0f} B"]])
    sweep = "; ".join(f"nprobe {s['knob']}: {s['recall_at_k']:.3f} at {s['p50_ms']:.1f} ms"
                      for s in r.get("knob_sweep", []))
    peers = _table(
        ["plain FAISS peer", "knob", "build", "B / vector", "p50", "recall@100",
         "same-identity recall"],
        [[p["config"], f"skipped: {p['skipped']}", "", "", "", "", ""] if "skipped" in p else
         [p["config"], _knob(p["knob"]), f"{p['build_s']:.0f} s",
          f"{p['bytes_per_vector']:,.0f}", f"{p['p50_ms']:.1f} ms", f"{p['recall_at_k']:.3f}",
          "-" if p["same_identity_recall"] is None else f"{p['same_identity_recall']:.3f}"]
         for p in r.get("peers", [])])
    front = r.get("frontier", {})

    def verdict(name: str) -> str:
        f = front.get(name, {})
        if f.get("on_frontier"):
            return "on the frontier (no peer is both faster and more accurate)"
        by = ", ".join(f"{d['config']} {_knob(d['knob'])}" for d in f.get("dominated_by", []))
        return f"dominated by {by}"

    budget = front.get("budget_bytes", 1024)
    return ("\n".join(rows) + f"\n\nSearch knob sweep: {sweep}.\n\n" + "\n".join(peers)
            + f"\n\nAmong all peers the store's point is {verdict('all_peers')}; among peers "
            f"within {budget:,} B / vector it is {verdict('within_budget')}.\n\n"
            f"k = 100, {report['args']['queries']} single queries, "
            f"{report['machine']['faiss_threads']} FAISS threads, faiss "
            f"{report['machine']['faiss']}, {_cpus(report)}; measured {_when(report)}.")


def prefilter_shards(report: Report) -> str:
    """``benchmarks/prefilter_shards.py``: the merged search over N shard processes, each
    shard alone, the fan-out's own cost, memory and balance per shard."""
    r, a = report["result"], report["args"]
    alone = {s["shard"]: s for s in r["shard_alone"]}
    rows = _table(["shard", "vectors", "store / vector", "store", "process RSS",
                   "p50 / p95 alone"],
                  [[str(s["shard"]), f"{s['vectors']:,}", f"{s['store_bytes_per_vector']:.0f} B",
                    f"{s['store_gib']:.2f} GiB", f"{s['rss_gib']:.2f} GiB",
                    f"{alone[s['shard']]['p50_ms']:.1f} / {alone[s['shard']]['p95_ms']:.1f} ms"]
                   for s in r["shards"]])
    m, fan = r["merged"], r["fanout_noop"]
    sizes = [s["vectors"] for s in r["shards"]]
    return ("\n".join(rows) + f"\n\n**Merged search over all {a['shards']} shards: p50 "
            f"{m['p50_ms']:.1f} ms, p95 {m['p95_ms']:.1f} ms, recall@100 "
            f"{m['recall_at_100']:.3f}** against exact float search over all "
            f"{a['n']:,} vectors ({a['queries']} queries). The fan-out alone (a no-op call to "
            f"every shard and back) takes {fan['p50_ms']:.1f} ms p50. Largest shard "
            f"{max(sizes) / (sum(sizes) / len(sizes)):.2f}× the mean ({a['cameras']:,} cameras "
            f"over {a['partitions']} partitions). Built in {r['build_wall_s'] / 60:.0f} min "
            f"with every shard building at once ({r['data_and_truth_s'] / 60:.0f} min of it "
            f"generating data and exact truth in the driver); {a['threads']} FAISS thread per "
            f"shard, all {a['shards']} shards and the driver on {_cpus(report)}; measured "
            f"{_when(report)}.")


def shard_cost_model(report: Report) -> str:
    """``benchmarks/prefilter_shards.py``'s cost model for a large site (docs/scale.md)."""
    c = report["result"]["cost_model"]
    env = " ".join(f"{k}={v}" for k, v in c["settings"].items())
    rows = _table(["", "value"], [
        ["crops / cameras", f"{c['site_crops']:,} / {c['site_cameras']:,}"],
        ["index bytes per crop (measured)", f"{c['bytes_per_vector']:.0f} B"],
        ["shards (index ≤ {:g} GiB each, a divisor of {} partitions)".format(
            c["shard_memory_budget_gib"], c["indexed_partitions"]), str(c["shards"])],
        ["crops per shard", f"{c['vectors_per_shard'] / 1e6:.1f} M"],
        ["memory per shard replica", f"{c['store_gib_per_shard']:.1f} GiB index + "
         f"{c['process_overhead_gib']:.1f} GiB process = {c['shard_pod_memory_gib']:.1f} GiB"],
        ["shard replicas per 64 GiB node (2 GiB left to the node)",
         str(c["shards_per_64gib_node"])],
        ["query p50 (estimate)", f"≈ {c['query_p50_ms_estimate']:.0f} ms: "
         f"{c['query_estimate_rule']}"],
        ["settings", f"`{env}`"],
    ])
    return "\n".join(rows) + f"\n\nFrom the shard benchmark measured {_when(report)}."


def text_prefilter(report: Report) -> str:
    """``benchmarks/text_prefilter.py``: a cold text query with the index's colour vectors vs
    reading every crop's image, per clue."""
    rows = _table(["clue", "colour vectors from the index", "read from the images",
                   "same ranking"],
                  [[f"“{q['clue']}”", f"{q['stored_ms']:.1f} ms", _ms(q["image_read_ms"]),
                    "yes" if q["same_ranking"] else "**no**"] for q in report["queries"]])
    a = report["args"]
    return ("\n".join(rows) + f"\n\np50 {report['stored_p50_ms']:.1f} ms against "
            f"{_ms(report['image_read_p50_ms'])}; {a['gallery']:,}-crop synthetic site, window "
            f"{a['window']:,}, k = {a['k']}, fresh readers (empty caches), {_cpus(report)}; "
            f"measured {_when(report)}.")


# --- HPT training chain -------------------------------------------------------------------------

def hpt_chain(report: Report) -> str:
    """``benchmarks/hpt_chain.py``: the embedder and HPT stages 1 → 2 → 3, and the whole chain."""
    emb = report["embedder"]
    # a whole-chain run records the embedder job's own wall; an --embedder-only run its total
    wall_min = emb["wall_min"] if "wall_min" in emb else emb["job_wall_s"] / 60
    rows = [[f"embedder ({emb['epochs']:.0f} epochs)", f"{wall_min:.1f} min",
             f"{emb['samples_per_s']:.1f}", "—", f"{emb['first_loss']:.2f} → {emb['loss']:.2f}",
             f"{emb['rank1']:.3f} (ImageNet start {emb['baseline_rank1']:.3f})"]]
    names = {1: "stage 1 (captioning)", 2: "stage 2 (retrieval tasks)",
             3: "stage 3 (Re-ID best choice)"}
    for s in report["stages"]:
        rows.append([names.get(s["stage"], f"stage {s['stage']}"), f"{s['wall_s'] / 60:.1f} min",
                     f"{s['train_samples_per_s']:.2f}",
                     f"{s['peak_rss_mib_per_worker'] / 1024:.1f} GiB",
                     f"{s['loss_first']:.2f} → {s['loss_last']:.2f}",
                     f"{s['eval_rank1']:.3f} (chance {s['eval_chance_rank1']:.3f})"])
    rows.append(["**whole chain** (incl. world synthesis, datasets, uploads)",
                 f"**{report['chain_wall_min']:.1f} min**", "", "", "", ""])
    table = _table(["job", "wall", "train samples/s", "peak RSS / worker", "loss first → last",
                    "held-out rank-1"], rows)
    last = report["stages"][-1]
    per_task = ", ".join(f"{k} {v:.2f}" for k, v in sorted(last["eval_rank1_per_task"].items()))
    target = f"{report['target_min']:g}-minute target"
    return "\n".join(table) + (
        f"\n\n{_verdict(report['target_met'], target)}. "
        f"Stage-3 held-out rank-1 per task: {per_task} (truth confidence "
        f"{last['eval_truth_confidence']:.2f}).\n\nPreset `{report['preset']}`, base "
        f"`{report['base_model']}`, ablation {report['ablation']}, {report['workers']} Ray Train "
        f"workers, {_cpus(report)}; " + (f"{report['note']}; " if report.get("note") else "")
        + f"measured {_when(report)}.")


def embedder_training(report: Report) -> str:
    """The prefilter embedder's held-out figures before and after training (``hpt_chain.json``)."""
    emb = report["embedder"]
    rows = _table(["embedder", "rank-1", "rank-5", "rank-10", "mAP"], [
        ["ImageNet MobileNetV2 (start)", f"{emb['baseline_rank1']:.3f}",
         f"{emb['baseline_rank5']:.3f}", f"{emb['baseline_rank10']:.3f}",
         f"{emb['baseline_mAP']:.3f}"],
        ["trained (identity + triplet, BNNeck)", f"**{emb['rank1']:.3f}**",
         f"**{emb['rank5']:.3f}**", f"**{emb['rank10']:.3f}**", f"**{emb['mAP']:.3f}**"],
    ])
    return "\n".join(rows) + (
        f"\n\n{emb['epochs']:.0f} epochs, {emb['samples_per_s']:.1f} samples/s, "
        f"{emb['dim']:.0f}-d, {report['workers']} workers, {_cpus(report)} "
        f"(`benchmarks/hpt_chain.py`); measured {_when(report)}.")


# --- retrieval on Ray Serve ---------------------------------------------------------------------

_KINDS = ["standard", "cloth_changing", "visible_infrared", "text_to_image", "attribute",
          "multimodal"]


def retrieval_serve(report: Report) -> str:
    """``benchmarks/retrieval_serve.py``: latency per query kind and K, prefix reuse,
    throughput per replica layout, replica memory."""
    lat = report["latency"]
    ks = sorted({r["k"] for r in lat})
    rows = []
    for k in ks:
        by_kind = {r["kind"]: r for r in lat if r["k"] == k}
        calls = [r["vlm_calls_per_query"] for r in by_kind.values()]
        rows.append([str(k)] + [f"{_s(by_kind[c]['p50_ms'])} / {_s(by_kind[c]['p95_ms'])} s"
                                if c in by_kind else "-" for c in _KINDS]
                    + [_span(calls)])
    table = _table(["K", *(c.replace("_", " ") for c in _KINDS), "VLM calls / query"], rows)
    reuse = report["prefix_reuse_k20"]
    thr = "; ".join(f"{t['replicas']} × {t['torch_threads']} (replicas × torch threads): "
                    f"{t['queries_per_s']:.3f} queries/s (p50 {_s(t['p50_ms'])} s)"
                    for t in report["throughput"])
    peak = max(m["peak_rss_mb"] for m in report["replicas_1x2_threads"])
    args = report["args"]
    return "\n".join(table) + (
        f"\n\np50 / p95 per kind. Prefix reuse at K = 20: {_s(reuse['without']['p50_ms'])} → "
        f"{_s(reuse['with']['p50_ms'])} s p50 = {reuse['speedup_p50']:.2f}× (target "
        f"{reuse['target']:g}×). Throughput at K = 20, {args['concurrency']} concurrent clients, "
        f"{args['throughput_queries']} queries: {thr}. Rerank replica peak memory after the "
        f"sweep: {peak / 1024:.1f} GiB.\n\n{args['gallery']:,}-crop synthetic site, "
        f"`{args['model']}`, {args['queries']} queries per kind and K, {_cpus(report)}; "
        f"measured {_when(report)}.")


# --- the reranker alone -------------------------------------------------------------------------

def rerank_prefix(report: Report) -> str:
    """``benchmarks/rerank_prefix.py``: the dialogue on the plain path, with prefix reuse,
    with batched groups, and with a warm vision cache, side by side."""
    def cell(r: dict, path: str) -> str:
        return f"{_ms(r[path]['p50_ms'])} ({r[path]['speedup_p50']:.2f}×)"

    def tokens(r: dict) -> str:
        return " → ".join(f"{r[p].get('decoder_tokens_per_query', float('nan')):.0f}"
                          for p in ("plain", "cached"))

    rows = _table(
        ["model", "K", "plain p50", "reuse p50", "+ batched groups", "+ warm vision cache",
         "forwards / query (plain · reuse · batched)", "decoder tokens / query (plain → "
         "cached)", "ViT images / query (plain → reuse → cached)",
         "same answers (max \\|Δp\\|)"],
        [[f"`{r['model']}`", r["k"], _ms(r["plain"]["p50_ms"]), cell(r, "reuse"),
          cell(r, "batched"), cell(r, "cached"),
          " · ".join(f"{r[p]['forwards_per_query']:.0f}" for p in ("plain", "reuse", "batched")),
          tokens(r),
          " → ".join(f"{r[p]['vit_images_per_query']:.0f}" for p in ("plain", "reuse", "cached")),
          ("yes" if r["same_choices"] else "**no**") + f" ({r['max_probability_diff']:.0e})"]
         for r in report["results"]])
    args = report["args"]
    k20 = [r for r in report["results"] if r["k"] == 20]
    verdict = "; ".join(
        f"`{r['model']}` {r['cached']['speedup_p50']:.2f}× — "
        + _verdict(r["cached"]["speedup_p50"] >= 3.5 and r["same_choices"], "≥ 3.5× target")
        for r in k20)
    return "\n".join(rows) + (
        f"\n\nSpeed-ups are over the plain path, p50 per query. At K = 20: {verdict}. "
        f"{''.join(_rerank_floor(r) for r in k20)}"
        f"{args['queries']} queries, groups of {args['group_size']}, {args['threads']} torch "
        f"threads, {_cpus(report)}; measured {_when(report)}.")


def _rerank_floor(r: dict) -> str:
    """Where the decoder's own cost already exceeds what the 3.5x target allows: what the warm
    cached path's forwards and decoder tokens cost at least, at the measured decoder cost
    (nothing for rows without the cost model, or whose floor is within the target)."""
    cost, cached = r.get("cost"), r["cached"]
    if not cost or "decoder_tokens_per_query" not in cached:
        return ""
    fwd, tok = cached["forwards_per_query"], cached["decoder_tokens_per_query"]
    floor = fwd * cost["forward_fixed_ms"] + tok * cost["per_token_ms"]
    allowed = r["plain"]["p50_ms"] / 3.5
    if floor <= allowed:
        return ""
    return (f"Where `{r['model']}`'s time goes: a decoder forward costs "
            f"{cost['forward_fixed_ms']:.0f} ms (reading every weight once) + "
            f"{cost['per_token_ms']:.2f} ms per token here, so by that cost the warm path's "
            f"{fwd:.0f} forwards over {tok:.0f} tokens per query take about {_ms(floor)} "
            f"(measured: {_ms(r['cached']['p50_ms'])}) - more than the "
            f"{_ms(allowed)} that 3.5× allows; its tokens are already "
            f"{r['plain']['decoder_tokens_per_query'] / tok:.1f}× fewer than the plain path's, "
            "so what is left is decoder compute, not overhead (a re-asked group must recompute "
            "every token after the pick it lost, or its answer would change). ")


def retrieval_serve_rerank(report: Report) -> str:
    """``benchmarks/retrieval_serve.py --kinds standard --no-throughput``: image-query latency
    over HTTP per K on the served rerank, and the served rerank against the plain path."""
    rows = _table(["K", "p50", "p95", "VLM calls / query"],
                  [[r["k"], f"{_s(r['p50_ms'])} s", f"{_s(r['p95_ms'])} s",
                    f"{r['vlm_calls_per_query']:.0f}"] for r in report["latency"]])
    cmp = report["prefix_reuse_k20"]
    args = report["args"]
    same = "same ranking" if cmp["same_ranking"] else "**rankings differ**"
    target = _verdict(cmp["speedup_p50"] >= cmp["target"], f"{cmp['target']:g}× target")
    return "\n".join(rows) + (
        f"\n\nK = 20 over HTTP, plain path → served rerank: {_s(cmp['without']['p50_ms'])} → "
        f"{_s(cmp['with']['p50_ms'])} s p50 = {cmp['speedup_p50']:.2f}× "
        f"({target}); "
        f"{cmp['vlm_calls']['without']:.0f} → {cmp['vlm_calls']['with']:.0f} VLM calls per "
        f"query; {same} (max |Δ confidence| {cmp['max_confidence_diff']:.0e}).\n\n"
        f"{args['gallery']:,}-crop synthetic site, `{args['model']}`, "
        f"{', '.join(args['kinds'])} queries, {args['queries']} per K, {_cpus(report)}; "
        f"measured {_when(report)}.")


# --- metrics ------------------------------------------------------------------------------------

def metrics_speed(report: Report) -> str:
    """``benchmarks/metrics_speed.py``: CMC + mAP + mINP at Market-1501's test size."""
    args = report["args"]
    rows = [["counted ranks (the shipped path)", f"{report['seconds_best']:.2f} s",
             ", ".join(f"{s:.2f}" for s in report["seconds_all"])]]
    if report.get("seconds_sorted_best") is not None:
        rows.append(["sort every row (the previous path)",
                     f"{report['seconds_sorted_best']:.2f} s",
                     ", ".join(f"{s:.2f}" for s in report["seconds_sorted_all"])])
    same, target = report.get("same_as_sorted"), f"under {report['target_s']:g} s"
    return "\n".join(_table(["path", "best", "all runs (s)"], rows)) + (
        f"\n\n{_verdict(report['meets_target'], target)}"
        + ("; identical metrics on both paths" if same else "")
        + f".\n\n{args['queries']:,} queries × {args['gallery']:,} gallery, `market1501` "
        f"protocol, {args['repeats']} repeats, {_cpus(report)}; measured {_when(report)}.")


# --- start-up ----------------------------------------------------------------------------------

def import_time(report: Report) -> str:
    """``benchmarks/import_time.py``: cold imports of the light modules and the CLI's help."""
    rows = []
    for case, r in report["cases"].items():
        target = r.get("target_s")
        verdict = ("-" if target is None
                   else f"< {target:g} s: {'met' if r['meets_target'] else '**not met**'}")
        total = r.get("importtime_s")
        rows.append([f"`{case}`", f"{r['median_s']:.2f} s",
                     ", ".join(f"{s:.2f}" for s in r["all_s"]),
                     "-" if total is None else f"{total:.2f} s", verdict])
    return "\n".join(_table(["command", "median", "all runs (s)", "`-X importtime` total",
                             "target"], rows)) + (
        f"\n\nEach run a fresh interpreter, {report['args']['runs']} runs, "
        f"{_cpus(report)}; measured {_when(report)}.")


# --- query load (existing) ----------------------------------------------------------------------

def query_load(report: Report) -> str:
    """The sustained-load table of ``benchmarks/query_load.py``."""
    args = report["args"]
    rows = ["| mode | answers | queries/s | p50 | p95 | p99 | VLM forwards/query | errors |",
            "|---|---|---|---|---|---|---|---|"]
    for m in report["modes"]:
        what = ("prefilter only (K = 1)" if m["mode"] == "prefilter"
                else f"K = {m['k']} reranked by `{m['model']}`")
        rows.append(f"| {what} | {m['answers']:,} | {m['throughput_qps']:.2f} | "
                    f"{_ms(m['p50_ms'])} | {_ms(m['p95_ms'])} | {_ms(m['p99_ms'])} | "
                    f"{m['vlm_calls_per_query']:.1f} | {m['errors_total']} |")
    load = sorted({x for m in report["modes"] for x in m.get("loadavg_1m", [])})
    note = (f"{report['gallery']:,} crops, {args['concurrency']} closed-loop clients, "
            f"{args['duration_s']:g} s per mode, access control "
            f"{'on' if report.get('access_control') else 'off'}, "
            f"{report['machine']['cpus']} cores"
            + (f" (load average {load[0]:g}–{load[-1]:g})" if load else "")
            + f"; measured {report['created_at']}")
    return "\n".join(rows) + f"\n\n{note}."


# --- real people --------------------------------------------------------------------------------

_STARTS = {  # benchmarks/real_people.py's fine-tuning recipes, as a reader should see them
    "osnet-head": "fine-tuned: OSNet frozen + trained head",
    "imagenet": "fine-tuned: MobileNetV2 from ImageNet (160×64)",
    "imagenet+osnet-teacher": "fine-tuned: MobileNetV2 from ImageNet, distilled from OSNet "
                              "(160×64)",
}


def real_people(report: Report) -> str:
    """The embedder table of ``benchmarks/real_people.py``: imports, fine-tuning, speed."""
    rows = ["| prefilter embedder | cuhk03_pair1 mAP (A→B / B→A) | rank-1 | synthetic mAP |",
            "|---|---|---|---|"]
    for r in report.get("imports", []):
        real = r["real"]
        rows.append(f"| {r['embedder']} | **{real['mAP']:.1%}** ({real['a2b_mAP']:.1%} / "
                    f"{real['b2a_mAP']:.1%}) | {real['rank1']:.1%} | "
                    f"{r['synthetic']['mAP']:.1%} |")
    for r in report.get("finetune", []):
        b, a = r["before"], r["after"]
        rows.append(f"| {_STARTS.get(r['start'], r['start'])} ({r['epochs']} epochs, "
                    f"{r['wall_s'] / 60:.0f} min) | {b['real']['mAP']:.1%} → "
                    f"**{a['real']['mAP']:.1%}** | {b['real']['rank1']:.1%} → "
                    f"{a['real']['rank1']:.1%} | {b['synthetic']['mAP']:.1%} → "
                    f"{a['synthetic']['mAP']:.1%} |")
    speed = ["| embedder | forward crops/s | `chatreid embed` end to end crops/s |",
             "|---|---|---|"]
    for r in report.get("throughput", []):
        e2e = r.get("end_to_end")
        end_to_end = f"{e2e['crops_per_s']:.1f}" if e2e else "not measured"
        speed.append(f"| {r['embedder']} | {r['forward_crops_per_s']:.0f} | {end_to_end} |")
    note = (f"{report['data']}; fine-tuning on its train/ + the synthetic world's train split, "
            f"scored on its val/ people (never trained on); forward = decode + preprocess + "
            f"forward on the val crops, batch 32; end to end = `benchmarks/ingest.py` (600 "
            f"synthetic crops) with that backbone in the embedding service; "
            f"{report['machine']['cpus']} cores; imports measured "
            f"{_measured(report, 'imports')}, fine-tuning {_measured(report, 'finetune')}, "
            f"speed {_measured(report, 'throughput')}")
    return "\n".join(rows) + "\n\n" + "\n".join(speed) + f"\n\n{note}."


def cuhk03_default(report: Report) -> str:
    """The shipped default embedder on ``cuhk03_pair1``, per direction (``real_people.json``)."""
    r = next(r for r in report["imports"] if "default" in r["embedder"])
    real = r["real"]
    rows = _table(["direction", "mAP", "rank-1"], [
        ["A→B", _pct(real["a2b_mAP"]), _pct(real["a2b_rank1"])],
        ["B→A", _pct(real["b2a_mAP"]), _pct(real["b2a_rank1"])],
        ["the task (average)", _pct(real["mAP"]), _pct(real["rank1"])],
    ])
    return "\n".join(rows) + (f"\n\n`{r['version']}`, {report['machine']['cpus']} cores "
                              f"(`benchmarks/real_people.py`); measured "
                              f"{_measured(report, 'imports')}.")


# --- the VLM rerank -----------------------------------------------------------------------------

def rerank_quality(report: Report) -> str:
    """``benchmarks/rerank_quality.py``: prefilter, peer and ChatReID rows per task."""
    def cell(v: dict | None, bold: bool = False) -> str:
        if not v:
            return "-"
        text = f"{v['mAP']:.1f} / {v['rank1']:.1f}"
        return f"**{text}**" if bold else text

    rows = ["| checkpoint | task | prefilter | best reorder of its top K | k-reciprocal (peer) "
            "| ChatReID (confidence) | ChatReID (fused, w) |", "|---|---|---|---|---|---|---|"]
    def above(v: dict | None, base: float) -> bool:  # as shown: a rounding tie is no gain
        return bool(v) and round(v["mAP"], 1) > round(base, 1)  # pyright: ignore[reportOptionalSubscript]

    for version, entry in report.get("checkpoints", {}).items():
        stage3 = _per_kind(entry.get("figures", {}).get("stage3", {}))
        for section in ("synthetic", "real"):
            for r in entry.get(section, {}).get("rows", []):
                base = (r["prefilter"] or {}).get("mAP", 0.0)
                conf, fused = r["chatreid_confidence"], r["chatreid_fused"]
                kind = r["task"].removeprefix("synth_")
                abstains = " (abstains)" if stage3.get(f"identity/kind/{kind}/abstain") else ""
                rows.append(
                    f"| {version[:12]} | {r['task']} | {cell(r['prefilter'])} | "
                    f"{cell(r.get('shortlist_ceiling'))} | {cell(r['peer_k_reciprocal'])} | "
                    f"{cell(conf, above(conf, base))}{abstains} | "
                    f"{cell(fused, above(fused, base))} ({r['fused_weight']}) |")
    acc = ["| checkpoint | stage-3 held-out task | chance | decoder alone | decoder + identity "
           "head |", "|---|---|---|---|---|"]
    for version, entry in report.get("checkpoints", {}).items():
        m = entry.get("figures", {}).get("stage3", {})
        for key in sorted(k for k in m if k.startswith("eval/rank1/")):
            task = key.removeprefix("eval/rank1/")
            chance = m.get(f"eval_with_identity/chance_rank1/{task}")
            with_id = m.get(f"eval_with_identity/rank1/{task}")
            acc.append(f"| {version[:12]} | {task} | "
                       f"{'-' if chance is None else f'{chance:.1%}'} | {m[key]:.1%} | "
                       f"{'-' if with_id is None else f'{with_id:.1%}'} |")
    tune = report.get("tuning")
    if tune:
        acc.append("")
        acc.append(f"Stage-3 decoder steps ({tune['model']}, batch 1): "
                   f"{tune['pixels_samples_per_s']:.2f} samples/s recomputing the frozen encoder, "
                   f"{tune['cached_samples_per_s']:.2f} on cached encoder outputs.")
    for version, entry in report.get("checkpoints", {}).items():
        ident = entry.get("figures", {}).get("stage3", {})
        if "identity/groups_per_s" in ident:
            acc.append(f"Identity head of {version[:12]}: {ident['identity/groups_per_s']:.0f} "
                       "groups/s on cached features.")
        heads = [("synthetic", {k.removeprefix("identity/"): v for k, v in ident.items()}),
                 ("cuhk03_pair1", entry.get("real", {}).get("identity_head") or {})]
        for where, figures in heads:
            if "memory/weight" in figures:
                w = figures["memory/weight"]
                acc.append(
                    f"Dialogue memory of the {where} head ({version[:12]}): weight {w:g}, fitted "
                    f"on {figures['memory/shortlists']:.0f} held-out shortlists (the head's own "
                    f"dialogue: mAP {figures['memory/mAP@0']:.1%} without memory, "
                    f"{figures[f'memory/mAP@{w:g}']:.1%} with it).")
            figures = _per_kind(figures)
            kinds = sorted(k.split("/")[1] for k in figures
                           if k.startswith("kind/") and k.endswith("/memory"))
            if kinds:
                on = (f"the fit world's people (seed {figures['fit/world_seed']:.0f}: people "
                      "and cameras the prefilter never saw)" if "fit/world_seed" in figures
                      else "held-out people's queries")
                acc.append(f"Dialogue per query kind of the {where} head ({version[:12]}), "
                           f"fitted on {on}: " + "; ".join(
                               f"{kind}{_clue(figures, kind)}, memory "
                               f"{figures[f'kind/{kind}/memory']:g} "
                               f"({figures[f'kind/{kind}/shortlists']:.0f} shortlists)"
                               f"{_gain(figures, kind)}"
                               for kind in kinds) + ".")
    note = (f"mAP / rank-1 (%), K = {report['k']}, {report['queries_per_task']} queries per task "
            "(half fit the fused weight, every row is scored on the other half); bold: above "
            "the prefilter; best reorder of its top K: the query's person first in the "
            "prefilter's shortlist (labels known) - no reranker of that shortlist scores higher; "
            f"{report['machine']}; measured {report['date']}")
    return ("\n".join(rows) + "\n\n" + _checkpoint_legend(report) + "\n\n" + "\n".join(acc)
            + f"\n\n{note}.")


def shortlist_choice(report: Report) -> str:
    """``benchmarks/shortlist_order.py``: the (k1, lambda) grid on train people, the choice,
    and the prefilter's cosine vs k-reciprocal order on held-out people."""
    lines = []
    c = report.get("choice")
    if c:
        rows = [["cosine order", "-", "-", f"{c['cosine']['mAP']:.1f}",
                 f"{c['cosine']['rank1']:.1f}"]]
        for g in c["grid"]:
            chosen = (g["k1"], g["lambda"]) == (c["chosen"]["k1"], c["chosen"]["lambda"])
            mark = "**" if chosen else ""
            rows.append([f"{mark}k-reciprocal{' (chosen)' if chosen else ''}{mark}",
                         str(g["k1"]), f"{g['lambda']:g}", f"{g['mAP']:.1f}", f"{g['rank1']:.1f}"])
        lines += _table(["order", "k1", "lambda", "mAP", "rank-1"], rows)
        same = c["chosen"] == c["settings"]
        lines += ["", f"Choosing on cuhk03-pair1 train: {c['people']} people (one camera-a image "
                  f"each) against their {c['gallery']} camera-b images, OSNet "
                  f"(`{c['embedder'].split('@')[0]}`), each query's cosine top {c['pool']} "
                  "re-ordered; rule: the highest mAP whose rank-1 is within half a point of the "
                  "cosine order's. The settings' defaults (k1 = "
                  f"{c['settings']['k1']}, lambda = {c['settings']['lambda']:g}) "
                  + ("are the choice." if same else "**are not the choice**."), ""]
    rows = [[r["task"], str(r["queries"]),
             f"{r['cosine']['mAP']:.1f} / {r['cosine']['rank1']:.1f}",
             f"{r['k_reciprocal']['mAP']:.1f} / {r['k_reciprocal']['rank1']:.1f}",
             f"{_change(r['k_reciprocal']['mAP'] - r['cosine']['mAP'])} / "
             f"{_change(r['k_reciprocal']['rank1'] - r['cosine']['rank1'])}"]
            for r in report.get("held_out", [])]
    lines += _table(["held-out task", "queries", "cosine order", "k-reciprocal order",
                     "change"], rows)
    cost = report.get("cost", {})
    lines += ["", f"mAP / rank-1 (%), the prefilter alone, every query of each task "
              f"(cuhk03_pair1: OSNet; synthetic: `{_synthetic_embedder(report)}`). Re-ordering "
              f"a pool of {cost.get('pool')} {cost.get('dim')}-d vectors: "
              f"{cost.get('p50_ms', 0):.1f} ms p50 a query. {report['machine']}; measured "
              f"{report['date']}."]
    return "\n".join(lines)


def _change(points: float) -> str:
    return "0.0" if round(points, 1) == 0 else f"{points:+.1f}"


def _synthetic_embedder(report: Report) -> str:
    names = [r["embedder"] for r in report.get("held_out", []) if r["task"].startswith("synth")]
    return names[0].split("@")[0] if names else "-"


def shortlist_order(report: Report) -> str:
    """``rerank_quality.py --shortlist-order k_reciprocal``: each checkpoint measured over the
    k-reciprocal shortlist beside its cosine-shortlist rows (the same tasks and queries)."""
    section = report.get("k_reciprocal")
    if not section or not section.get("checkpoints"):
        return "Not measured yet (`benchmarks/rerank_quality.py --shortlist-order k_reciprocal`)."

    def cell(v: dict | None) -> str:
        return "-" if not v else f"{v['mAP']:.1f} / {v['rank1']:.1f}"

    rows = ["| checkpoint | task | prefilter, cosine | ChatReID, cosine shortlist | prefilter, "
            "k-reciprocal order | ChatReID, k-reciprocal shortlist | k-reciprocal (peer) |",
            "|---|---|---|---|---|---|---|"]
    gains = []
    for version, entry in section["checkpoints"].items():
        # the cosine rows of the same checkpoint, or of the one the run named (``--cosine-rows``:
        # the same decoder with its head fitted over the cosine shortlist)
        cosine = report.get("checkpoints", {}).get(entry.get("cosine_rows", version), {})
        for part in ("synthetic", "real"):
            before = {r["task"]: r for r in cosine.get(part, {}).get("rows", [])}
            for r in entry.get(part, {}).get("rows", []):
                b = before.get(r["task"], {})
                rows.append(f"| {version[:12]} | {r['task']} | {cell(b.get('prefilter'))} | "
                            f"{cell(b.get('chatreid_confidence'))} | {cell(r['prefilter'])} | "
                            f"{cell(r['chatreid_confidence'])} | "
                            f"{cell(r['peer_k_reciprocal'])} |")
                if b.get("chatreid_confidence") and r["chatreid_confidence"]:
                    gains.append((r["task"], r["chatreid_confidence"]["mAP"]
                                  - b["chatreid_confidence"]["mAP"]))
    up = [t for t, g in gains if round(g, 1) > 0]
    down = [t for t, g in gains if round(g, 1) < 0]
    verdict = (f"ChatReID mAP over the k-reciprocal shortlist against the cosine one: higher on "
               f"{len(up)} of {len(gains)} task rows ({', '.join(up) or 'none'}), lower on "
               f"{len(down)} ({', '.join(down) or 'none'}).")
    note = (f"mAP / rank-1 (%), K = {report['k']}; ChatReID ranked by confidence; the "
            f"k-reciprocal order re-orders each query's cosine top {section['pool']} among "
            f"themselves (k1 = {section['k1']}, lambda = {section['lambda_value']}, k2 = 6); the "
            "peer row re-ranks all test queries and the whole gallery at once, which a live "
            "query cannot. Cosine columns: the checkpoint's rows in the table above.")
    labels = [f"- `{v[:12]}`: {e['label']}"
              + (f"; cosine columns: `{e['cosine_rows'][:12]}`" if e.get("cosine_rows") else "")
              for v, e in section["checkpoints"].items() if e.get("label")]
    legend = "\n\nCheckpoints:\n" + "\n".join(labels) if labels else ""
    return "\n".join(rows) + f"\n\n{verdict}{legend}\n\n{note}"


def _checkpoint_legend(report: Report) -> str:
    """What each checkpoint in the table is: its label, the synthetic prefilter it reranked and
    the backbone its identity head sits on (when recorded)."""
    lines = ["Checkpoints:"]
    for version, entry in report.get("checkpoints", {}).items():
        synthetic = entry.get("synthetic", {})
        parts = [entry.get("label", "unlabelled")]
        if synthetic.get("prefilter"):
            parts.append(f"synthetic prefilter `{synthetic['prefilter'].split('@')[0]}`")
        if synthetic.get("identity_backbone"):
            parts.append(f"head on `{synthetic['identity_backbone'].split('@')[0]}`")
        lines.append(f"- `{version[:12]}`: " + "; ".join(parts))
    return "\n".join(lines)


_ABLATION = re.compile(r"^(?P<preset>\w+) preset, stages (?P<stages>3|2\+3|1\+2\+3)$")
_ABLATIONS = ("3", "2+3", "1+2+3")


def stage_ablation(report: Report) -> str:
    """The paper's Table 4 from ``rerank_quality.json``: the default preset's three chains (the
    checkpoints labelled '<preset> preset, stages <ablation>'), ChatReID mAP per synthetic task
    beside the prefilter, and whether each stage adds (the mean over the tasks rises from
    chain to chain)."""
    chains: dict[str, tuple[str, dict]] = {}
    for version, entry in report.get("checkpoints", {}).items():
        m = _ABLATION.match(entry.get("label", ""))
        if not (m and m["preset"] == "default" and entry.get("synthetic")):
            continue
        earlier = chains.get(m["stages"])  # a chain measured again: its newest entry counts
        if earlier is None or entry.get("measured", "") >= earlier[1].get("measured", ""):
            chains[m["stages"]] = (version, entry)
    if not chains:
        return "No default-preset chain measured yet."
    tasks = [r["task"] for r in next(iter(chains.values()))[1]["synthetic"]["rows"]]

    def short(embedder_version: str) -> str:  # the weights' hash, without the input size
        name = embedder_version.split("@")[0]  # (ImageNet's whole name: it says what it is)
        return name if name.startswith("imagenet") else name[-12:]

    def by_task(entry: dict, key: str) -> dict[str, float]:
        return {r["task"]: r[key]["mAP"] for r in entry["synthetic"]["rows"] if r.get(key)}

    prefilters = {e["synthetic"]["prefilter"]: e for _, e in chains.values()}
    # entries from before the head's backbone was recorded: unknown, never equal to another
    heads = {e["synthetic"].get("identity_backbone", f"unrecorded {v}") for v, e in chains.values()}
    rows = []
    for prefilter, entry in prefilters.items():
        base = by_task(entry, "prefilter")
        rows.append([f"prefilter `{short(prefilter)}`", "-",
                     *(f"{base[t]:.1f}" for t in tasks), f"{sum(base.values()) / len(base):.2f}"])
    means = []
    for stages in _ABLATIONS:
        if stages not in chains:
            rows.append([f"stages {stages}", "not measured yet", *("-" for _ in tasks), "-"])
            continue
        version, entry = chains[stages]
        got = by_task(entry, "chatreid_confidence")
        means.append(sum(got.values()) / len(got))
        when = f", {entry['measured'][:10]}" if entry.get("measured") else ""
        over = short(entry["synthetic"]["prefilter"])
        head = entry["synthetic"].get("identity_backbone", "")
        head = f", head on `{short(head)}`" if head else ""
        rows.append([f"stages {stages}", f"`{version[:12]}` (over `{over}`{head}{when})",
                     *(f"{got[t]:.1f}" for t in tasks), f"{means[-1]:.2f}"])
    if len(means) < len(_ABLATIONS):
        verdict = "**each stage adds: not decided** (a chain is not measured yet)"
    elif len(prefilters) > 1:
        verdict = ("**each stage adds: not decided** (the chains were measured over different "
                   "prefilter embedders)")
    elif len(heads) > 1:
        verdict = ("**each stage adds: not decided** (the chains' identity heads sit on "
                   "different backbones, or one's is not recorded)")
    else:
        verdict = _verdict(all(round(b, 2) > round(a, 2) for a, b in itertools.pairwise(means)),
                           "each stage adds (mean mAP rises chain to chain)")
    return "\n".join(_table(["chain", "checkpoint (prefilter, head backbone, measured)",
                             *map(_task_label, tasks),
                             "mean"], rows)) + (
        f"\n\n{verdict}. ChatReID mAP (%, confidence mode) per synthetic task, K = "
        f"{report['k']}, the test half of {report['queries_per_task']} queries per task, each "
        f"chain over the default preset's prefilter embedder of its run (a chain compares only "
        f"with chains over the same one); `benchmarks/rerank_quality.py --label "
        f"'default preset, stages <chain>'`.")


def _per_kind(figures: dict) -> dict:
    """Figures with the per-kind fit under ``kind/`` (results from before image kinds were
    fitted name it ``clue/``)."""
    legacy = ("clue/", "identity/clue/")
    return {k.replace("clue/", "kind/", 1) if k.startswith(legacy) else k: v
            for k, v in figures.items()}


def _clue(figures: dict, kind: str) -> str:
    w = figures.get(f"kind/{kind}/weight", 0.0)
    return f" clue weight {w:g}" if w else ""


def _gain(figures: dict, kind: str) -> str:
    """How the fitted dialogue compares with the prefilter's order on held-out people."""
    if f"kind/{kind}/gain_lower_bound" not in figures:
        return ""
    w, m = figures[f"kind/{kind}/weight"], figures[f"kind/{kind}/memory"]
    verdict = "abstains" if figures[f"kind/{kind}/abstain"] else "reranks"
    chosen = figures.get(f"kind/{kind}/mAP", figures.get(f"kind/{kind}/mAP@{w:g},{m:g}"))
    plain = " on the plain cosine" if figures.get(f"kind/{kind}/plain") else ""
    return (f"{plain}, mAP {chosen:.1%} vs the prefilter's order "
            f"{figures[f'kind/{kind}/prefilter_mAP']:.1%}, gain lower bound "
            f"{100 * figures[f'kind/{kind}/gain_lower_bound']:+.1f} points: {verdict}")


def identity_head(report: Report) -> str:
    """The identity head alone on held-out groups against the backbone's cosine and chance
    (``rerank_quality.json``: the checkpoint's synthetic head; the OSNet head on real people)."""
    rows = []
    for version, entry in report.get("checkpoints", {}).items():
        m = entry.get("figures", {}).get("stage3", {})
        for key in sorted(k for k in m if k.startswith("identity/eval/rank1/")):
            task = key.removeprefix("identity/eval/rank1/")
            rows.append([version[:12], f"synthetic {task}",
                         _pct(m.get(f"identity/eval/chance_rank1/{task}")),
                         _pct(m.get(f"identity/eval/cosine_rank1/{task}")),
                         _pct(m.get(f"identity/eval/decoder_rank1/{task}")), _pct(m[key])])
        real = entry.get("real", {}).get("identity_head")
        if real:
            rows.append([version[:12], f"cuhk03_pair1 ({real['eval_groups']:.0f} groups)",
                         _pct(real.get("eval/chance_rank1")),
                         _pct(real.get("eval/cosine_rank1")), "-", _pct(real.get("eval/rank1"))])
    table = _table(["checkpoint", "held-out groups", "chance", "backbone cosine", "decoder alone",
                    "identity head"], rows)
    return "\n".join(table) + (
        f"\n\nBest-choice rank-1 on groups of held-out people (`benchmarks/rerank_quality.py`); "
        f"{report['machine']}; measured {report['date']}.")


def status(rerank: Report, people: Report) -> str:
    """README's status lines: where the rerank stands against the prefilter, and real people."""
    lines = []
    for version, entry in rerank.get("checkpoints", {}).items():
        rows = [r for s in ("synthetic", "real") for r in entry.get(s, {}).get("rows", [])]
        below = [r["task"] for r in rows
                 if r["chatreid_confidence"] and r["prefilter"]
                 and r["chatreid_confidence"]["mAP"] < r["prefilter"]["mAP"]]
        label = f", {entry['label']}" if entry.get("label") else ""
        line = (f"- VLM rerank (`{version[:12]}`{label}, ranked by confidence): below the "
                f"prefilter in mAP on {len(below)} of {len(rows)} tasks")
        for r in rows:
            if r["task"] == "cuhk03_pair1":
                line += (f"; on real people (cuhk03_pair1) {r['chatreid_confidence']['mAP']:.1f}"
                         f" vs the prefilter's {r['prefilter']['mAP']:.1f} mAP")
        lines.append(line + ".")
    best = max(people.get("imports", []) + [f["after"] | {"embedder": _STARTS.get(f["start"],
                                                                                   f["start"])}
                                            for f in people.get("finetune", [])],
               key=lambda r: r["real"]["mAP"])
    default = next(r for r in people["imports"] if "default" in r["embedder"])
    lines.append(f"- Prefilter on real people (cuhk03_pair1 mAP): shipped default "
                 f"{default['real']['mAP']:.1%}, best {best['real']['mAP']:.1%} "
                 f"({best['embedder']}).")
    return "\n".join(lines) + (f"\n\n(Rendered from benchmarks/results: measured {rerank['date']} "
                               f"and {_measured(people, 'imports')}.)")


# --- the evaluation suite -----------------------------------------------------------------------

_TASKS = ["synth_standard", "synth_cloth_changing", "synth_visible_infrared",
          "synth_text_to_image", "synth_attribute", "synth_multimodal",
          "synth_adaptive"]  # synth_multimodal's name in results written before the rename


def _task_label(task: str) -> str:
    name = task.removeprefix("synth_")
    return "multimodal" if name == "adaptive" else name.replace("_", " ")


def eval_synthetic(report: Report) -> str:
    """``docs/eval/results.json`` (``chatreid eval --suite synthetic``): mAP / rank-1 per task,
    the prefilter baseline then one row per model."""
    def cell(m: dict | None) -> str:
        return "-" if not m else f"{m['mAP']:.1%} / {m['rank1']:.1%}".replace("%", "")

    models: dict[str, list[dict]] = report["models"]
    tasks = [t for t in _TASKS if any(r["task"] == t for rs in models.values() for r in rs)]
    first = next(iter(models.values()))
    base = {r["task"]: r["baseline"] for r in first}
    rows = [["prefilter (baseline)", *(cell(base.get(t)) for t in tasks)]]
    for label, results in models.items():
        by_task = {r["task"]: r.get("chatreid") for r in results}
        rows.append([f"ChatReID, {label}", *(cell(by_task.get(t)) for t in tasks)])
    calls = [r["vlm_calls"] / r["queries"] for rs in models.values() for r in rs if r["queries"]]
    cfg = report["config"]
    return "\n".join(_table(["method", *map(_task_label, tasks)], rows)) + (
        f"\n\nmAP / rank-1 (%), K = {cfg['k']}, up to {cfg['max_queries']} queries per task, "
        f"prefilter `{report['embedder']}`, {_span(calls)} VLM calls per query, "
        f"{report['machine']}; measured {report['date']}.")


# --- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    render: Callable[..., str]
    sources: tuple[str, ...]  # JSON files relative to the repository root, passed in order


def scaling(ingest_: Report, search: Report, compressed: Report, serve: Report) -> str:
    """deploy/README's sizing table: what one replica of each tier measured, and the planning
    figure derived from it (per core, per million crops, per replica)."""
    cpus = ingest_["machine"]["cpus"]
    e2e, fwd = ingest_["end_to_end"], ingest_["embedder"]
    h, w = fwd["input"]
    runs = sorted(search["results"], key=lambda r: r["n"])
    p50s = ", ".join(f"{r['p50_ms']:.1f} ms at {r['n']:,}" for r in runs)
    per_vec = max(r["memory_bytes_per_vector"] for r in runs)
    lat = serve["latency"]
    spans = "; ".join(
        f"K = {k}: {_span([r['p50_ms'] / 1000 for r in lat if r['k'] == k])} s p50"
        for k in sorted({r["k"] for r in lat}))
    best = max(serve["throughput"], key=lambda t: t["queries_per_s"])
    rss = [m["rss_mb"] for t in serve["throughput"] for m in t["replica_memory"]]
    peak = max(m["peak_rss_mb"] for m in serve["replicas_1x2_threads"])
    ingestor = sum(v for k, v in e2e["cpu_core_seconds"].items() if k.startswith("ingestor"))
    small = compressed["results"][0]
    rows = _table(["component", "measured", "plan with"], [
        [f"embedder ({fwd['batch']} × {h}×{w} batches)",
         f"{fwd['forward_crops_per_s']:.0f} crops/s forward alone; {e2e['crops_per_s']:.1f} "
         "crops/s end to end with ingestor, broker and store on the same cores",
         f"≈ {e2e['crops_per_s'] / cpus:.0f} crops/s per CPU core per embedder replica; a "
         "site's crop rate ÷ that = replicas (≤ partitions − 1)"],
        [f"prefilter search ({runs[0]['dim']}-d, k = {search['args']['k']})",
         f"{p50s} crops; {per_vec / 1000:.1f} KB per crop",
         f"memory ≈ {per_vec * 1e6 / 1e9:.1f} GB per million crops per Prefilter replica"],
        [f"prefilter search, `index.kind = compressed` ({small['dim']}-d, k = 100)",
         f"{small['p50_ms']:.1f} ms p50 at {small['n']:,} crops, recall@100 "
         f"{small['recall_at_k']:.3f}; {small['memory_bytes_per_vector']:,.0f} B per crop",
         f"memory ≈ {small['memory_bytes_per_vector'] * 1e6 / 1e9:.2f} GB per million crops "
         "per Prefilter replica; search time grows with the crops a replica holds"],
        [f"rerank replica (`{serve['args']['model']}`, full dialogue)",
         f"{spans}; {best['queries_per_s']:.3f} queries/s at K = 20 with "
         f"{serve['args']['concurrency']} clients; {min(rss) / 1024:.1f}–{max(rss) / 1024:.1f} "
         f"GiB resident ({peak / 1024:.1f} GiB peak)",
         f"≈ {best['queries_per_s'] / cpus:.2f} queries/s per core at K = 20; "
         f"{math.ceil(peak / 1024)} GiB per replica (its peak, rounded up)"],
        ["ingestor", f"validate + store + publish: {ingestor:g} of "
         f"{e2e['cpu_core_seconds_available']:g} core-seconds in the ingest benchmark",
         "not the bottleneck: 1–2 replicas per site"],
    ])
    return "\n".join(rows) + (f"\n\n{cpus} CPU cores, no GPU; measured "
                               f"{_when(ingest_)}, {_when(search)}, {_when(compressed)}, "
                               f"{_when(serve)}.")


def trait_reader(report: Report) -> str:
    """``trait_reader.py``: cloth-changing ranking by cosine and by trait agreement, and each
    trait's accuracy on the test people."""
    rows = _table(["cloth-changing ranking", "mAP", "rank-1", "rank-10"],
                  ([name, f"{f['mAP']:.1f}", f"{f['rank1']:.1f}", f"{f['rank10']:.1f}"]
                   for name, f in report["cloth_changing"].items()))
    accuracy = _table(["trait", "accuracy on the test people", "majority value"],
                      ([t, f"{a['accuracy']:.0f}%", f"{a['majority']:.0f}%"]
                       for t, a in report["trait_accuracy"].items()))
    train, test = report["train"], report["test"]
    scored = next(iter(report["cloth_changing"].values()))["queries"]
    note = (f"mAP / rank-1 / rank-10 (%). Synthetic world, LTCC layout, `ltcc_cc` protocol: "
            f"{scored} of {test['queries']} queries scored against {test['gallery']} gallery "
            f"crops (the rest have no crop of their person in other clothes from another "
            f"camera). The reader (`{train['version']}`) trained "
            f"{train['seconds']:.0f} s on {train['crops']} labelled crops of the train people "
            f"(`--extra-people {report['args']['extra_people']}`). {_cpus(report)}, no GPU; "
            f"measured {_when(report)}.")
    return "\n".join(rows) + "\n\n" + "\n".join(accuracy) + "\n\n" + note


def _results(*names: str) -> tuple[str, ...]:
    return tuple(f"benchmarks/results/{n}.json" for n in names)


BLOCKS: dict[str, Block] = {
    "ingest": Block(ingest, _results("ingest")),
    "prefilter_search": Block(prefilter_search,
                              _results("prefilter_search", "prefilter_search_256")),
    "prefilter_compressed": Block(prefilter_compressed,
                                  _results("prefilter_compressed_512")),
    "text_prefilter": Block(text_prefilter, _results("text_prefilter")),
    "prefilter_shards": Block(prefilter_shards, _results("prefilter_shards")),
    "shard_cost_model": Block(shard_cost_model, _results("prefilter_shards")),
    "hpt_chain": Block(hpt_chain, _results("hpt_chain")),
    "hpt_chain_quick": Block(hpt_chain, _results("hpt_chain_quick")),
    "embedder_training": Block(embedder_training, _results("hpt_chain")),
    "retrieval_serve": Block(retrieval_serve, _results("retrieval_serve")),
    "retrieval_serve_k20_text_prefilter": Block(
        retrieval_serve, _results("retrieval_serve_k20_text_prefilter")),
    "rerank_prefix": Block(rerank_prefix, _results("rerank_prefix")),
    "retrieval_serve_rerank": Block(retrieval_serve_rerank,
                                    _results("retrieval_serve_rerank")),
    "metrics_speed": Block(metrics_speed, _results("metrics_speed")),
    "query_load": Block(query_load, _results("query_load")),
    "import_time": Block(import_time, _results("import_time")),
    "real_people": Block(real_people, _results("real_people")),
    "cuhk03_default": Block(cuhk03_default, _results("real_people")),
    "rerank_quality": Block(rerank_quality, _results("rerank_quality")),
    "identity_head": Block(identity_head, _results("rerank_quality")),
    "stage_ablation": Block(stage_ablation, _results("rerank_quality")),
    "shortlist_order": Block(shortlist_order, _results("rerank_quality")),
    "shortlist_choice": Block(shortlist_choice, _results("shortlist_order")),
    "trait_reader": Block(trait_reader, _results("trait_reader")),
    "status": Block(status, _results("rerank_quality", "real_people")),
    "eval_synthetic": Block(eval_synthetic, ("docs/eval/results.json",)),
    "scaling": Block(scaling, _results("ingest", "prefilter_search", "prefilter_compressed_512",
                                       "retrieval_serve")),
}
_BLOCK = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", re.S)
_OPEN = re.compile(r"<!-- bench:(\w+) -->")


class UnknownBlock(ValueError):
    """A marker names no renderer (a typo would otherwise leave hand-typed figures unchecked)."""


def rendered(name: str, root: Path = ROOT) -> str:
    """Block ``name`` rendered from its JSON, markers included."""
    if name not in BLOCKS:
        raise UnknownBlock(f"<!-- bench:{name} --> names no renderer in benchmarks/readme.py")
    block = BLOCKS[name]
    reports = [json.loads((root / s).read_text()) for s in block.sources]
    return f"<!-- bench:{name} -->\n{block.render(*reports)}\n<!-- /bench:{name} -->"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every bench block rendered from its JSON."""
    unclosed = set(_OPEN.findall(text)) - {m.group(1) for m in _BLOCK.finditer(text)}
    if unclosed:
        raise UnknownBlock(f"unclosed block(s): {', '.join(sorted(unclosed))}")
    return _BLOCK.sub(lambda m: rendered(m.group(1), root), text)


def stale_blocks(text: str, root: Path = ROOT) -> list[str]:
    """Names of the blocks in ``text`` whose content differs from their JSON."""
    return [m.group(1) for m in _BLOCK.finditer(text) if m.group(0) != rendered(m.group(1), root)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="only check; exit 1 naming every stale block")
    p.add_argument("paths", nargs="*", type=Path,
                   help="Markdown files (default: README.md, benchmarks/README.md, docs/*.md)")
    args = p.parse_args(argv)
    paths = args.paths or [d for d in documents() if d.exists()]
    failed = False
    for path in paths:
        text = path.read_text()
        try:
            fresh = render(text)
        except (UnknownBlock, FileNotFoundError) as err:
            print(f"{path}: {err}", file=sys.stderr)
            failed = True
            continue
        if not args.check:
            if fresh != text:
                path.write_text(fresh)
                print(f"rewrote {path}")
            continue
        for name in stale_blocks(text):
            sources = ", ".join(BLOCKS[name].sources)
            print(f"{path}: block bench:{name} is stale (differs from {sources}); run python "
                  "benchmarks/readme.py", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
