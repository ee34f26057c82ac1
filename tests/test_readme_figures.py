"""The README's benchmark figures are rendered from benchmarks/results, never typed in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_figures_match_the_benchmark_json() -> None:
    run = subprocess.run([sys.executable, "benchmarks/readme.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_stale_figure_is_caught(tmp_path) -> None:
    text = (ROOT / "README.md").read_text()
    assert "<!-- bench:query_load -->" in text
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("| prefilter only (K = 1) |", "| prefilter only (K = 1) | 1 |"))
    run = subprocess.run([sys.executable, "benchmarks/readme.py", "--check", "--readme",
                          str(stale)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "differ" in run.stderr
