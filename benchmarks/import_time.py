"""Start-up cost of the light entry points: wall time of ``import chatreid.access``, ``import
chatreid.client`` and ``chatreid --help``, each in a fresh interpreter (median of N runs), and
for the imports the cumulative time ``python -X importtime`` reports for the module (targets:
``import chatreid.access`` under 1 s, ``chatreid --help`` under 1.5 s).

Data: none - the installed package in this virtual environment, imported cold in a new
process each run (the OS file cache is warm after the first run, as on a developer's machine).

    python benchmarks/import_time.py [--runs 5] [--out benchmarks/results/import_time.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import header, write
from rich.console import Console
from rich.table import Table

CHATREID = Path(sys.executable).with_name("chatreid")
# name -> (command, target in seconds, the module whose -X importtime total is read, if any)
CASES: dict[str, tuple[list[str], float | None, str | None]] = {
    "import chatreid.access": ([sys.executable, "-c", "import chatreid.access"], 1.0,
                               "chatreid.access"),
    "import chatreid.client": ([sys.executable, "-c", "import chatreid.client"], None,
                               "chatreid.client"),
    "chatreid --help": ([str(CHATREID), "--help"], 1.5, None),
}


def wall_s(command: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def importtime_s(module: str) -> float:
    """The cumulative import time ``-X importtime`` reports for ``module`` itself (its whole
    import tree, interpreter start-up excluded)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         check=True, capture_output=True, text=True, timeout=120)
    for line in run.stderr.splitlines():  # "import time: self [us] | cumulative | name"
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6
    raise RuntimeError(f"-X importtime did not report {module}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/import_time.json"))
    args = p.parse_args()
    console = Console()
    wall_s(CASES["import chatreid.access"][0])  # warm the file cache once, not measured
    rows: dict[str, dict[str, float | bool | list[float] | None]] = {}
    for name, (command, target, module) in CASES.items():
        times = [wall_s(command) for _ in range(args.runs)]
        median = statistics.median(times)
        row: dict[str, float | bool | list[float] | None] = {
            "median_s": median, "all_s": times, "target_s": target,
            "meets_target": None if target is None else median < target}
        if module is not None:
            row["importtime_s"] = statistics.median(importtime_s(module)
                                                    for _ in range(args.runs))
        rows[name] = row
    report = header("import_time", __doc__, args, python=sys.version.split()[0])
    report["cases"] = rows
    table = Table("command", "median wall s", "-X importtime s", "target s", "ok")
    for name, row in rows.items():
        it, ok = row.get("importtime_s"), row["meets_target"]
        table.add_row(name, f"{row['median_s']:.2f}", "-" if it is None else f"{it:.2f}",
                      "-" if row["target_s"] is None else f"< {row['target_s']}",
                      "-" if ok is None else ("yes" if ok else "NO"))
    console.print(table)
    write(args.out, report, console)


if __name__ == "__main__":
    main()
