"""The documentation's figures are rendered from benchmarks/results, never typed in; the README
stays short; every relative link in the docs leads somewhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "deploy" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]


def _readme_module():
    return load_benchmark("readme")


def _check(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/readme.py", "--check", *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True)


def test_every_figure_block_matches_its_json() -> None:
    run = _check()
    assert run.returncode == 0, run.stderr


def test_a_stale_figure_is_caught_and_its_block_named(tmp_path: Path) -> None:
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert "<!-- bench:query_load -->" in text
    stale = tmp_path / "bench.md"
    stale.write_text(text.replace("| prefilter only (K = 1) |", "| prefilter only (K = 1) | 1 |"))
    run = _check(stale)
    assert run.returncode == 1
    assert f"{stale}: block bench:query_load is stale" in run.stderr
    assert "bench:rerank_quality" not in run.stderr  # only the edited block is named


def test_an_unknown_block_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- bench:no_such_table -->\n| 1 |\n<!-- /bench:no_such_table -->\n")
    run = _check(doc)
    assert run.returncode == 1 and "no_such_table" in run.stderr


def test_every_result_file_and_renderer_is_shown_somewhere() -> None:
    readme = _readme_module()
    used = {m for doc in DOCS for m in re.findall(r"<!-- bench:(\w+) -->", doc.read_text())}
    assert set(readme.BLOCKS) <= used, f"renderers no page shows: {set(readme.BLOCKS) - used}"
    sources = {s for name in used for s in readme.BLOCKS[name].sources}
    results = {f"benchmarks/results/{p.name}" for p in (ROOT / "benchmarks/results").glob("*.json")}
    assert results <= sources, f"results no page renders: {results - sources}"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for m in _LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


_ROOTS = "chatreid|services|ray_jobs|schemas|tests|benchmarks|helm|deploy"
_PATH = re.compile(rf"(?<![\w/.])((?:{_ROOTS})/[\w/.\-]*\w/?)(?:::(\w+))?")
_DOTTED = re.compile(r"(?<![\w/.])((?:chatreid|services|ray_jobs|schemas)(?:\.\w+)+)")


def _module(parts: list[str]) -> tuple[Path | None, list[str]]:
    """The longest importable prefix of a dotted name and the attribute path after it."""
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists():
                return candidate, parts[i:]
    return None, parts


def _defines(source: Path, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", source.read_text()) is not None


@pytest.mark.parametrize("doc", DOCS,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_path_the_docs_name_exists(doc: Path) -> None:
    """Folders, files and dotted names in backticks (``chatreid/query/``,
    ``ray_jobs/hpt.py::attach_identity``, ``chatreid.model.identity.FeatureCache``) still exist:
    a rename that forgets the docs fails here."""
    missing = []
    for code in re.findall(r"`([^`]+)`", doc.read_text()):
        for m in _PATH.finditer(code):
            path, attr = m.group(1), m.group(2)
            if "<" in path or "*" in path:
                continue  # a pattern, not a path
            if not (ROOT / path).exists():
                missing.append(path)
            elif attr and not _defines(ROOT / path, attr):
                missing.append(f"{path}::{attr}")
        for m in _DOTTED.finditer(code):
            name = m.group(1)
            if re.search(r"\.v\d+$", name):
                continue  # a topic (chatreid.crops.v1)
            source, rest = _module(name.split("."))
            if source is None or (rest and not _defines(source, rest[0])):
                missing.append(name)
    assert not missing, f"{doc.relative_to(ROOT)} names what no longer exists: {missing}"


def _chain(stages: str, mean: float) -> tuple[str, dict]:
    rows = [{"task": t, "prefilter": {"mAP": 10.0, "rank1": 0.0},
             "chatreid_confidence": {"mAP": mean, "rank1": 0.0}} for t in ("synth_standard",
                                                                            "synth_attribute")]
    return f"hpt3-{stages}", {"label": f"default preset, stages {stages}",
                              "synthetic": {"prefilter": "emb@256x128",
                                            "identity_backbone": "emb@256x128", "rows": rows}}


@pytest.mark.parametrize(("means", "verdict"), [
    ((10.0, 11.0, 12.0), "each stage adds (mean mAP rises chain to chain): met"),
    ((10.0, 12.0, 12.0), "each stage adds (mean mAP rises chain to chain): not met"),
    ((10.0, 12.0, None), "each stage adds: not decided"),
])
def test_table_4_says_each_stage_adds_only_when_every_chain_is_measured_and_rises(
        means, verdict) -> None:
    """Table 4's verdict comes from the labelled chains: all three, each mean above the last;
    a quick-preset checkpoint never stands in for a default-preset chain."""
    checkpoints = dict(_chain(s, m) for s, m in zip(("3", "2+3", "1+2+3"), means, strict=True)
                       if m is not None)
    _, quick = _chain("1+2+3", 99.0)
    checkpoints["hpt3-quick"] = {**quick, "label": "quick preset, stages 1+2+3"}
    report = {"checkpoints": checkpoints, "k": 10, "queries_per_task": 60}
    text = _readme_module().stage_ablation(report)
    assert f"**{verdict}**" in text
    assert "99.0" not in text


def test_table_4_does_not_compare_chains_over_different_prefilters() -> None:
    checkpoints = dict(_chain(s, m) for s, m in zip(("3", "2+3", "1+2+3"), (1.0, 2.0, 3.0),
                                                    strict=True))
    checkpoints["hpt3-3"]["synthetic"]["prefilter"] = "other-embedder@256x128"
    report = {"checkpoints": checkpoints, "k": 10, "queries_per_task": 60}
    text = _readme_module().stage_ablation(report)
    assert "**each stage adds: not decided** (the chains were measured over different" in text


@pytest.mark.parametrize("head", ["imagenet-mobilenetv2@256x128", None])
def test_table_4_does_not_compare_chains_whose_heads_sit_on_different_backbones(head) -> None:
    """Over one prefilter, a chain whose identity head sits on another backbone (or whose
    backbone was not recorded) is not the same experiment: a '2+3' head fell back to ImageNet
    features while the '3' chain's had the trained embedder's."""
    checkpoints = dict(_chain(s, m) for s, m in zip(("3", "2+3", "1+2+3"), (1.0, 2.0, 3.0),
                                                    strict=True))
    synthetic = checkpoints["hpt3-2+3"]["synthetic"]
    if head is None:
        del synthetic["identity_backbone"]
    else:
        synthetic["identity_backbone"] = head
    report = {"checkpoints": checkpoints, "k": 10, "queries_per_task": 60}
    text = _readme_module().stage_ablation(report)
    assert "**each stage adds: not decided** (the chains' identity heads sit on different" in text


def test_table_4_takes_a_chain_measured_again_from_its_newest_entry() -> None:
    """A chain re-run over a new prefilter embedder keeps its label; the older checkpoint's
    entry (listed after it, over another embedder) must not stand in for it."""
    newer = _chain("1+2+3", 3.0)[1] | {"measured": "2026-12-07T06:52:26+00:00"}
    older = _chain("1+2+3", 1.5)[1] | {"measured": "2026-12-05T10:00:00+00:00"}
    older["synthetic"] = {**older["synthetic"], "prefilter": "old-embedder@256x128"}
    checkpoints = dict(_chain(s, m) for s, m in zip(("3", "2+3"), (1.0, 2.0), strict=True))
    checkpoints |= {"hpt3-new": newer, "hpt3-old": older, "hpt3-unlabelled-date": _chain(
        "1+2+3", 0.5)[1]}
    report = {"checkpoints": checkpoints, "k": 10, "queries_per_task": 60}
    text = _readme_module().stage_ablation(report)
    assert "`hpt3-new`" in text and "`hpt3-old`" not in text and "hpt3-unlabelled" not in text
    assert "**each stage adds (mean mAP rises chain to chain): met**" in text


def _row(task: str, prefilter: float, chatreid: float) -> dict:
    m = lambda v: {"mAP": v, "rank1": v}  # noqa: E731
    return {"task": task, "prefilter": m(prefilter), "chatreid_confidence": m(chatreid),
            "peer_k_reciprocal": None}


def test_the_k_reciprocal_table_sets_each_row_beside_the_same_checkpoints_cosine_row() -> None:
    """Cosine columns come from the checkpoint's own cosine entry, task by task, and the verdict
    counts the rows where ChatReID over the k-reciprocal shortlist rose or fell."""
    report = {"k": 10, "checkpoints": {"hpt3-a": {"synthetic": {"rows": [
        _row("synth_standard", 50.0, 51.0), _row("synth_visible_infrared", 3.5, 3.5)]}}},
        "k_reciprocal": {"pool": 100, "k1": 10, "lambda_value": 0.5, "checkpoints": {
            "hpt3-a": {"synthetic": {"rows": [_row("synth_standard", 55.0, 56.0),
                                              _row("synth_visible_infrared", 3.4, 3.4)]}}}}}
    text = _readme_module().shortlist_order(report)
    assert "| hpt3-a | synth_standard | 50.0 / 50.0 | 51.0 / 51.0 | 55.0 / 55.0 | 56.0 / 56.0 |" \
        in text
    assert ("higher on 1 of 2 task rows (synth_standard), lower on 1 "
            "(synth_visible_infrared)") in text


def test_a_k_reciprocal_run_compares_with_the_cosine_rows_it_names() -> None:
    """A checkpoint whose head was fitted over the k-reciprocal shortlist is compared with the
    same decoder's cosine-fitted head (``--cosine-rows``), not with rows of its own that do not
    exist, and the legend says which."""
    report = {"k": 10, "checkpoints": {
        "hpt3-cosinehead": {"synthetic": {"rows": [_row("synth_standard", 35.8, 35.8)]}}},
        "k_reciprocal": {"pool": 100, "k1": 10, "lambda_value": 0.3, "checkpoints": {
            "hpt3-krechead": {"label": "quick preset", "cosine_rows": "hpt3-cosinehead",
                              "synthetic": {"rows": [_row("synth_standard", 38.7, 38.7)]}}}}}
    text = _readme_module().shortlist_order(report)
    assert "| hpt3-krechea | synth_standard | 35.8 / 35.8 | 35.8 / 35.8 | 38.7 / 38.7 |" in text
    assert "higher on 1 of 1 task rows (synth_standard)" in text
    assert "- `hpt3-krechea`: quick preset; cosine columns: `hpt3-cosineh`" in text


@pytest.mark.parametrize(("settings", "says"), [
    ({"k1": 10, "lambda": 0.5}, "are the choice."), ({"k1": 20, "lambda": 0.3},
                                                     "**are not the choice**.")])
def test_the_shortlist_choice_says_whether_the_defaults_are_what_the_rule_chose(
        settings, says) -> None:
    grid = [{"k1": 10, "lambda": 0.5, "mAP": 36.0, "rank1": 33.0},
            {"k1": 20, "lambda": 0.3, "mAP": 35.0, "rank1": 32.0}]
    report = {"date": "d", "machine": "m", "choice": {
        "people": 500, "gallery": 2455, "embedder": "osnet@256x128", "pool": 100,
        "cosine": {"mAP": 30.8, "rank1": 33.4}, "grid": grid,
        "chosen": {"k1": 10, "lambda": 0.5}, "settings": settings},
        "held_out": [], "cost": {"pool": 100, "dim": 512, "p50_ms": 3.0}}
    text = _readme_module().shortlist_choice(report)
    assert f"lambda = {settings['lambda']:g}) {says}" in text
    assert "| **k-reciprocal (chosen)** | 10 | 0.5 | 36.0 | 33.0 |" in text
