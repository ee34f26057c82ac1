"""Does the VLM rerank beat the prefilter it reranks? (issue 16's acceptance figures)

Per task, measured in one run on the same queries: the prefilter alone, the k-reciprocal peer
(Zhong et al. 2017) over the same prefilter, ChatReID ranked by the dialogue's confidence (the
paper's mode) and ChatReID fused with the prefilter (its weight fitted on a validation half of
the queries, every row scored on the other half; ``chatreid.evaluation.ranking``).

* ``synthetic`` - the six synthetic tasks, K = 10, with each VLM checkpoint named (default: the
  newest stage-3 checkpoint, e.g. the quick preset's) and the newest embedder as the prefilter;
* ``real`` - ``cuhk03_pair1`` (needs ``../shared``; read at run time, nothing derived is
  written into the project) with the imported OSNet as the prefilter. The checkpoint's decoder
  gets an identity head on OSNet trained here, in memory, on ``cuhk03-pair1/train`` groups
  whose galleries are OSNet's own shortlists (the epoch chosen on held-out train people);
* the checkpoints' own figures: stage-3 held-out best-choice accuracy per task against chance
  (decoder alone and decoder + identity head) and tuning samples/s. The quick preset's wall
  time is ``benchmarks/hpt_chain.py --preset quick``'s.

Needs the local stack (`chatreid up --no-ray`) and a trained checkpoint
(`chatreid train --stage all --preset quick`).

    python benchmarks/rerank_quality.py [--vlm VERSION ...] [--queries 60] [--sections ...]
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

from chatreid.checkpoints import find, latest
from chatreid.config import Settings
from chatreid.embedder.load import load_embedder, resolve_embedder
from chatreid.evaluation import BENCHMARKS, SYNTHETIC, EvalConfig
from chatreid.evaluation.runner import TaskResult, evaluate_task, in_process_reranker
from chatreid.query import ModelSpec, VLMRuntime

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir()
OSNET = SHARED / "weights" / "osnet_x0_25_msmt17.onnx"
CUHK03 = SHARED / "data" / "cuhk03-pair1"
OUT = ROOT / "benchmarks" / "results" / "rerank_quality.json"
console = Console()


def row(result: TaskResult) -> dict:
    def m(metrics) -> dict | None:
        return None if metrics is None else {"mAP": round(100 * metrics.mAP, 2),
                                             "rank1": round(100 * metrics.cmc[0], 2)}
    return {"task": result.task, "queries_scored": result.queries,
            "prefilter": m(result.baseline), "shortlist_ceiling": m(result.ceiling),
            "peer_k_reciprocal": m(result.peer),
            "chatreid_confidence": m(result.chatreid), "chatreid_fused": m(result.fused),
            "fused_weight": result.fused_weight, "vlm_calls": result.vlm_calls,
            "notes": result.notes}


def evaluate(tasks, root: Path, embedder, runtime: VLMRuntime, cfg: EvalConfig) -> list[dict]:
    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        res = evaluate_task(task, root, embedder.embed, in_process_reranker(runtime), cfg)
        rows.append(row(res) | {"wall_s": round(time.perf_counter() - t0, 1)})
        show(rows[-1])
    return rows


def show(r: dict) -> None:
    cells = [f"{k}: {v['mAP']:.1f}/{v['rank1']:.1f}" for k, v in r.items()
             if isinstance(v, dict) and "mAP" in v]
    console.print(f"[bold]{r['task']}[/] ({r['queries_scored']} queries, "
                  f"w={r['fused_weight']}) " + "  ".join(cells))


def checkpoint_figures(settings: Settings, version: str) -> dict:
    """Held-out best-choice accuracy vs chance per task, tuning speed, from the manifests of
    the checkpoint and its ancestors, each stage's from its newest checkpoint: a refitted
    identity head's stage-3 parent must not stand in for it."""
    event = find(settings, "vlm", version)
    out: dict = {"version": version}
    chain = []
    while event is not None:
        chain.append(event)
        event = find(settings, "vlm", event.parent_version) if event.parent_version else None
    for ev in chain:
        m = ev.metrics or {}
        keep = {k: round(v, 4) for k, v in m.items()
                if k.startswith(("eval/", "eval_with_identity/", "identity/", "gate/"))
                or k in ("train_samples_per_s", "samples_per_s", "vision_cache_hits")}
        out.setdefault(ev.stage, keep)
    return out


def real_identity(runtime: VLMRuntime, settings: Settings, epochs: int,
                  served: EvalConfig | None = None):
    """The checkpoint's decoder with an identity head on OSNet, trained on cuhk03 train."""
    from chatreid.data.datasets.cuhk03_pair1 import CUHK03Pair1
    from chatreid.model.identity import IdentityVision
    from chatreid.tuning.identity import (
        Group,
        HeadRecipe,
        fit_decoder_weight,
        fit_kinds,
        fit_memory,
        shortlists,
        split_by_person,
        train_identity_head,
    )

    osnet = load_embedder(OSNET)
    train = CUHK03Pair1(CUHK03).train
    feats = osnet.embed([Image.open(r.path).convert("RGB") for r in train])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    pid = np.array([r.pid for r in train])
    cam = np.array([r.camid for r in train])
    rng = np.random.default_rng(0)
    groups = []
    for q in range(len(train)):  # every train crop queries the other camera's shortlist
        other = np.flatnonzero(cam != cam[q])
        top = other[np.argsort(-(unit[other] @ unit[q]))[:10]]
        if not (pid[top] == pid[q]).any():
            continue
        match = int(rng.choice(top[pid[top] == pid[q]]))
        shown = [match, *[int(i) for i in top if pid[i] != pid[q]][:7]]
        order = rng.permutation(len(shown))
        shown = [shown[i] for i in order]
        groups.append(Group("standard", str(q), tuple(map(str, shown)),
                            shown.index(match), int(pid[q])))
    fit, val = split_by_person(groups)
    table = {str(i): f for i, f in enumerate(feats)}
    head = train_identity_head(fit, table, val, table, osnet.version,
                               HeadRecipe(epochs=epochs), progress=True)
    # how far to trust the decoder beside the head: fitted on held-out train people's groups
    # with the decoder's answers (one forward each, as served)
    asked = [Group(g.task, g.query, g.candidates, g.answer, g.pid,
                   decoder_answer(runtime, train, g)) for g in val[:DECODER_GROUPS]]
    head.cfg.decoder_weight, figures = fit_decoder_weight(head, asked, table)
    head.cfg.metrics |= figures
    console.print(f"decoder weight on cuhk03 train (held-out people): {figures}")
    # dialogue memory fitted on the held-out train people's cross-camera shortlists
    people = {int(g.pid) for g in val if g.pid is not None}
    queries = [i for i in range(len(train)) if pid[i] in people]
    lists = shortlists("standard", queries, feats, pid,
                       [np.flatnonzero(cam != cam[i]) for i in queries], served=served)
    head.cfg.memory, figures = fit_memory(head, lists)
    fit = fit_kinds(head, lists)  # as training does: abstain unless it surely gains
    head.cfg.kind_memory, head.cfg.abstain = fit.memory, fit.abstain
    figures |= fit.figures
    head.cfg.metrics |= figures
    console.print(f"dialogue memory on cuhk03 train (held-out people): {figures}")
    identity = IdentityVision(osnet, head)
    return VLMRuntime(runtime.model, runtime.processor, runtime.spec, settings.serve,
                      identity), osnet, head.cfg.metrics


DECODER_GROUPS = 150  # held-out groups the decoder answers to fit its weight (~1 min)


def decoder_answer(runtime: VLMRuntime, records, group) -> tuple[float, ...]:
    """The decoder's index log-probabilities for one group, read as a served turn reads them."""
    from chatreid.model.prompting import choice_tokens
    from chatreid.rerank import Query
    from chatreid.rerank.judge import make_judge

    def image(key: str) -> Image.Image:
        return Image.open(records[int(key)].path).convert("RGB")

    tokens = choice_tokens(runtime.processor.tokenizer, len(group.candidates))
    judge = make_judge(runtime.model, runtime.processor, Query("standard", image=image(
        group.query)), [image(k) for k in group.candidates], tokens, reuse_prefix=True)
    probs = judge(range(len(group.candidates)))  # no identity head: the decoder alone
    return tuple(float(x) for x in np.log(np.clip(probs, 1e-12, 1)))


def tuning(settings: Settings, n: int = 12) -> dict:
    """Stage-3 decoder steps/s on the last training run's stage-3 samples: the frozen encoder
    recomputed every step (pixels) vs its cached outputs (``VisionCache``), batch 1, same
    samples, after one warm-up pass that also fills the cache."""
    from itertools import islice

    from chatreid.data.build import iter_samples
    from chatreid.model import build_model
    from chatreid.tuning.collate import collate, encode_sample
    from chatreid.tuning.hpt import VisionCache
    from chatreid.tuning.stages import rule_for

    run = json.loads((settings.train.out_dir / "report.json").read_text())
    samples = list(islice(iter_samples(settings, run["datasets"]["3"]["dataset_id"], 3), n))
    root = settings.train.world

    def load(rel: str) -> Image.Image:
        return Image.open(root / rel)

    model, processor = build_model(run["base_model"])
    model.train()
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    rule, pad = rule_for(3), processor.tokenizer.pad_token_id
    cache = VisionCache(model)

    def step(sample, cached: bool) -> None:
        enc = encode_sample(sample, processor, load, rule)
        batch = collate([enc], pad)
        if cached and "pixel_values" in batch:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            feats = cache.features(model, [f"{k}|3" for k in sample.images],
                                   enc["pixel_values"], enc["image_grid_thw"])
            batch.pop("pixel_values")
            batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                pooler_output=feats)}
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    out = {"samples": len(samples), "model": run["base_model"]}
    for label, cached in (("warm-up", True), ("pixels", False), ("cached", True)):
        t0 = time.perf_counter()
        for sample in samples:
            step(sample, cached)
        if label != "warm-up":
            out[f"{label}_samples_per_s"] = round(len(samples) / (time.perf_counter() - t0), 3)
    console.print(f"stage-3 decoder steps: {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vlm", nargs="*", default=None,
                    help="VLM checkpoint versions (default: the newest stage-3 checkpoint)")
    ap.add_argument("--embedder", default="latest", help="the prefilter on synthetic tasks")
    ap.add_argument("--queries", type=int, default=60, help="queries per task (half fit w)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sections", default="tuning,synthetic,real")
    ap.add_argument("--label", nargs="*", default=None,
                    help="one per --vlm: what the checkpoint is, e.g. 'default preset, stages "
                         "2+3' (the README's Table 4 reads '<preset> preset, stages <ablation>')")
    ap.add_argument("--shortlist-order", choices=("cosine", "k_reciprocal"), default="cosine",
                    help="the prefilter's order of image-only queries (serve.shortlist_order); "
                         "k_reciprocal runs are kept apart, under 'k_reciprocal' in the JSON")
    ap.add_argument("--cosine-rows", nargs="*", default=None,
                    help="k_reciprocal runs, one per --vlm: the checkpoint whose cosine-shortlist "
                         "rows these are compared with (default: the same version), e.g. the "
                         "same decoder with its head fitted over the cosine shortlist")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.label is not None and len(args.label) != len(args.vlm or []):
        ap.error("give one --label per --vlm version")
    if args.cosine_rows is not None and (args.shortlist_order != "k_reciprocal"
                                         or len(args.cosine_rows) != len(args.vlm or [])):
        ap.error("--cosine-rows: one per --vlm version, with --shortlist-order k_reciprocal")
    settings = Settings()
    sections = set(args.sections.split(","))
    versions = args.vlm or [latest(settings, "vlm", "stage3").version]
    serve = settings.serve.model_copy(update={"shortlist_order": args.shortlist_order})
    cfg = EvalConfig.served(serve, k=args.k, max_queries=args.queries, ranking="fused")
    report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))}"
                               " CPUs", "k": args.k, "queries_per_task": args.queries,
                    "checkpoints": {}}
    if args.out.is_file():  # keep the sections not re-run
        report = json.loads(args.out.read_text()) | {k: v for k, v in report.items()
                                                      if k != "checkpoints"}
        report.setdefault("checkpoints", {})
    synth_root = settings.train.world
    if "tuning" in sections:
        report["tuning"] = tuning(settings)
    entries = report["checkpoints"]
    if args.shortlist_order == "k_reciprocal":  # the same checkpoints over another shortlist
        section = report.setdefault("k_reciprocal", {"checkpoints": {}})
        section.update(pool=cfg.pool, k1=cfg.k1, lambda_value=cfg.lambda_value)
        entries = section["checkpoints"]
    for n, version in enumerate(versions):
        entry = entries.setdefault(version, {})
        if args.label is not None:
            entry["label"] = args.label[n]
        if args.cosine_rows is not None:
            entry["cosine_rows"] = args.cosine_rows[n]
        entry["measured"] = report["date"]  # the report's date moves with every run
        runtime = VLMRuntime.load(settings, ModelSpec.of_checkpoint(find(settings, "vlm",
                                                                         version)))
        entry["figures"] = checkpoint_figures(settings, version)
        if "synthetic" in sections:
            embedder = resolve_embedder(settings, args.embedder)
            console.rule(f"synthetic suite - VLM {version}, prefilter {embedder.version}")
            tasks = list(SYNTHETIC.values())
            entry["synthetic"] = {"prefilter": embedder.version,
                                  "identity_backbone": (runtime.identity.version
                                                        if runtime.identity else None),
                                  "rows": evaluate(tasks, synth_root, embedder, runtime, cfg)}
        if "real" in sections and OSNET.is_file() and CUHK03.is_dir():
            console.rule(f"cuhk03_pair1 - VLM {version} + OSNet identity head, prefilter OSNet")
            real_rt, osnet, head_figures = real_identity(runtime, settings, epochs=40,
                                                         served=cfg)
            entry["real"] = {"prefilter": osnet.version, "identity_head": head_figures,
                             "rows": evaluate([BENCHMARKS["cuhk03_pair1"]], CUHK03, osnet,
                                              real_rt, cfg)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary(report)
    console.print(f"results: {args.out}")


def summary(report: dict) -> None:
    table = Table("checkpoint", "task", "prefilter", "k-reciprocal", "ChatReID (conf.)",
                  "ChatReID (fused, w)", title="mAP / rank-1 (%)")
    for version, entry in report["checkpoints"].items():
        for section in ("synthetic", "real"):
            for r in entry.get(section, {}).get("rows", []):
                def cell(key: str, r=r) -> str:
                    v = r.get(key)
                    return "-" if not v else f"{v['mAP']:.1f} / {v['rank1']:.1f}"
                table.add_row(version[:12], r["task"], cell("prefilter"),
                              cell("peer_k_reciprocal"), cell("chatreid_confidence"),
                              f"{cell('chatreid_fused')} ({r['fused_weight']})")
    console.print(table)


if __name__ == "__main__":
    main()
