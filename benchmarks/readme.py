"""Write benchmark figures into the README from their JSON, so the prose never drifts from the
measurement: each ``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->`` block is rendered from
``benchmarks/results/NAME.json``.

    python benchmarks/readme.py          # rewrite the blocks
    python benchmarks/readme.py --check  # exit 1 when a block differs from its JSON (tested)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def query_load(report: dict) -> str:
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


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


_STARTS = {  # benchmarks/real_people.py's fine-tuning recipes, as a reader should see them
    "osnet-head": "fine-tuned: OSNet frozen + trained head",
    "imagenet": "fine-tuned: MobileNetV2 from ImageNet (160×64)",
    "imagenet+osnet-teacher": "fine-tuned: MobileNetV2 from ImageNet, distilled from OSNet "
                              "(160×64)",
}


def real_people(report: dict) -> str:
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
            f"{report['machine']['cpus']} cores; measured {report['created_at']}")
    return "\n".join(rows) + "\n\n" + "\n".join(speed) + f"\n\n{note}."


def rerank_quality(report: dict) -> str:
    """``benchmarks/rerank_quality.py``: prefilter, peer and ChatReID rows per task."""
    def cell(v: dict | None, bold: bool = False) -> str:
        if not v:
            return "-"
        text = f"{v['mAP']:.1f} / {v['rank1']:.1f}"
        return f"**{text}**" if bold else text

    rows = ["| checkpoint | task | prefilter | k-reciprocal (peer) | ChatReID (confidence) "
            "| ChatReID (fused, w) |", "|---|---|---|---|---|---|"]
    for version, entry in report.get("checkpoints", {}).items():
        for section in ("synthetic", "real"):
            for r in entry.get(section, {}).get("rows", []):
                base = (r["prefilter"] or {}).get("mAP", 0.0)
                conf, fused = r["chatreid_confidence"], r["chatreid_fused"]
                rows.append(
                    f"| {version[:12]} | {r['task']} | {cell(r['prefilter'])} | "
                    f"{cell(r['peer_k_reciprocal'])} | "
                    f"{cell(conf, bool(conf) and conf['mAP'] > base)} | "
                    f"{cell(fused, bool(fused) and fused['mAP'] > base)} "
                    f"({r['fused_weight']}) |")
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
    note = (f"mAP / rank-1 (%), K = {report['k']}, {report['queries_per_task']} queries per task "
            "(half fit the fused weight, every row is scored on the other half); bold: above "
            f"the prefilter; {report['machine']}; measured {report['date']}")
    return "\n".join(rows) + "\n\n" + "\n".join(acc) + f"\n\n{note}."


RENDERERS: dict[str, Callable[[dict], str]] = {"query_load": query_load,
                                               "real_people": real_people,
                                               "rerank_quality": rerank_quality}
_BLOCK = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", re.S)


def render(text: str) -> str:
    """``text`` with every bench block rendered from its JSON."""
    def block(m: re.Match) -> str:
        name = m.group(1)
        report = json.loads((RESULTS / f"{name}.json").read_text())
        return f"<!-- bench:{name} -->\n{RENDERERS[name](report)}\n<!-- /bench:{name} -->"
    return _BLOCK.sub(block, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args()
    text = args.readme.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print(f"{args.readme}: benchmark figures differ from benchmarks/results; run "
                  "python benchmarks/readme.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
