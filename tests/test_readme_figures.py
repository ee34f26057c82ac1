"""The documentation's figures are rendered from benchmarks/results, never typed in; the README
stays short; every relative link in the docs leads somewhere."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]


def _readme_module():
    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "benchmarks" / "readme.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
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
