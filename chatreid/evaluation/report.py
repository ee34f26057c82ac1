"""The evaluation report: JSON, a markdown file laid out like the paper's tables (mAP and
rank-1 per benchmark, one table per task family; a stage-ablation table when several models
were evaluated), and a CMC plot per task.

Rows per family table: the prefilter (baseline), the k-reciprocal peer (Zhong et al. 2017, the
same prefilter's features; image-only queries), each model's ChatReID in the paper's mode
(ranked by the dialogue's confidence) and, when the run used ``ranking="fused"``, its fused row
with the weight ``w`` it used (fitted per task on a validation half unless given)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from chatreid.evaluation.runner import EvalConfig, TaskResult
from chatreid.viz import line_chart

FAMILIES = {
    "standard": "Table 1 - standard Re-ID",
    "cloth_changing": "Table 2 - cloth-changing Re-ID",
    "visible_infrared": "Table 3 - visible-infrared Re-ID",
    "text_to_image": "Table 5 - text-to-image Re-ID",
    "attribute": "Attribute-based retrieval",
    "multimodal": "Adaptive multi-modal retrieval (image + text, cloth-changing)",
}


def _cell(m) -> str:
    if m is None or math.isnan(m.mAP):
        return "n/a"
    return f"{100 * m.mAP:.1f} / {100 * m.rank(1):.1f}"


def _fused_row(label: str, rs: list[TaskResult]) -> tuple[str, list[str]]:
    """The fused row's label and cells: one ``w`` in the label, or each task's in its cell."""
    weights = {r.fused_weight for r in rs if r.fused is not None}
    if len(weights) == 1:
        return f"ChatReID ({label}, fused, w={weights.pop():g})", [_cell(r.fused) for r in rs]
    return (f"ChatReID ({label}, fused, w fitted per task)",
            [_cell(r.fused) + (f" (w={r.fused_weight:g})" if r.fused is not None else "")
             for r in rs])


def write_report(results: dict[str, list[TaskResult]], cfg: EvalConfig, out: Path,
                 header: dict) -> Path:
    """``results``: model label -> its task results (the first model's baseline is shown)."""
    out.mkdir(parents=True, exist_ok=True)
    labels = list(results)
    first = results[labels[0]]
    (out / "results.json").write_text(json.dumps({
        **header, "config": cfg.__dict__,
        "models": {label: [_json(r) for r in rs] for label, rs in results.items()}},
        indent=2) + "\n")
    lines = [f"# ChatReID evaluation - {header.get('suite', '')}", "",
             ", ".join(f"{k}: {v}" for k, v in header.items() if k != "suite"), "",
             f"Inference: the prefilter's top {cfg.k}"
             + (f" with similarity ≥ {cfg.tau}" if cfg.tau is not None else "")
             + " are reranked by the VLM's multi-turn best-choice dialogue and ranked by "
             "response confidence (the stick-breaking share of the model's belief each pick "
             "holds); every other gallery item follows in the prefilter's order. The fused rows "
             "rank the shortlist by w * confidence + (1 - w) * softmax(prefilter similarity / "
             "0.05); where w was fitted, it was fitted on a validation half of each task's "
             "queries and every row of that task is scored on the other half (see Notes). "
             "The prefilter (baseline row) is the image embedder for image queries, the "
             "colour-attribute matcher for text and attribute queries, and both for multimodal "
             "ones; the k-reciprocal peer re-ranks the same image features (k1 = 20, k2 = 6, "
             "lambda = 0.3; image-only queries). Cells are mAP / rank-1 (%).", ""]
    for family, title in FAMILIES.items():
        tasks = [r for r in first if r.family == family]
        if not tasks:
            continue
        lines += [f"## {title}", "", "| method | " + " | ".join(r.task for r in tasks) + " |",
                  "|---" * (len(tasks) + 1) + "|",
                  "| prefilter (baseline) | " + " | ".join(_cell(r.baseline) for r in tasks)
                  + " |"]
        if any(r.peer is not None for r in tasks):
            lines.append("| k-reciprocal (peer) | " + " | ".join(_cell(r.peer) for r in tasks)
                         + " |")
        for label in labels:
            by_task = {r.task: r for r in results[label]}
            mine = [by_task[r.task] for r in tasks]
            lines.append(f"| ChatReID ({label}, confidence) | "
                         + " | ".join(_cell(r.chatreid) for r in mine) + " |")
            if any(r.fused is not None for r in mine):
                name, cells = _fused_row(label, mine)
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(labels) > 1:
        tasks = [r.task for r in first]
        lines += ["## Table 4 - stage ablation (mAP / rank-1)", "",
                  "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for label in labels:
            by_task = {r.task: r for r in results[label]}
            lines.append(f"| {label} | " + " | ".join(_cell(by_task[t].chatreid)
                                                       for t in tasks) + " |")
        lines.append("")
    lines += ["## Details", "", "| task | protocol | model | queries | runs | R1 | R5 | R10 | "
              "mAP | mINP | VLM calls | calls / query |", "|---" * 12 + "|"]
    for label in labels:
        for r in results[label]:
            rows = [("prefilter", r.baseline, 0)] if label == labels[0] else []
            if r.peer is not None and label == labels[0]:
                rows.append(("k-reciprocal (peer)", r.peer, 0))
            if r.chatreid is not None:
                rows.append((label, r.chatreid, r.vlm_calls))
            if r.fused is not None:
                rows.append((f"{label}, fused (w={r.fused_weight:g})", r.fused, r.vlm_calls))
            for name, m, calls in rows:
                per = f"{calls / r.queries:.1f}" if calls and r.queries else "-"
                lines.append(f"| {r.task} | {r.protocol} | {name} | {r.queries} | {r.runs} | "
                             + " | ".join(_pct(m, k) for k in ("1", "5", "10", "mAP", "mINP"))
                             + f" | {calls or '-'} | {per} |")
    notes = sorted({n for rs in results.values() for r in rs for n in r.notes})
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    for r in first:
        if math.isnan(r.baseline.mAP):
            continue
        series = {"prefilter": r.baseline.cmc[:20]}
        if r.peer is not None:
            series["k-reciprocal (peer)"] = r.peer.cmc[:20]
        for label in labels:
            mine = {x.task: x for x in results[label]}[r.task]
            if mine.chatreid is not None:
                series[f"ChatReID ({label})"] = mine.chatreid.cmc[:20]
            if mine.fused is not None:
                series[f"ChatReID ({label}, fused)"] = mine.fused.cmc[:20]
        line_chart(series, f"CMC - {r.task}").save(out / f"cmc_{r.task}.png")
    return report


def _pct(m, key: str) -> str:
    if math.isnan(m.mAP):
        return "n/a"
    value = m.rank(int(key)) if key.isdigit() else getattr(m, key)
    return f"{100 * value:.1f}"


def _json(r: TaskResult) -> dict:
    return {"task": r.task, "family": r.family, "protocol": r.protocol, "queries": r.queries,
            "runs": r.runs, "vlm_calls": r.vlm_calls, "notes": r.notes,
            "baseline": None if math.isnan(r.baseline.mAP) else r.baseline.summary(),
            "peer": r.peer.summary() if r.peer else None,
            "chatreid": r.chatreid.summary() if r.chatreid else None,
            "fused": r.fused.summary() if r.fused else None, "fused_weight": r.fused_weight}
