"""What every benchmark writes: a header (name, time, machine, data, args) and the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def header(name: str, doc: str, args: argparse.Namespace, **machine: Any) -> dict[str, Any]:
    """``doc`` is the script's docstring; its "Data: ..." paragraph describes the inputs."""
    return {
        "benchmark": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    **machine},
        "data": doc.split("Data: ")[1].split("\n\n")[0].replace("\n", " "),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write(out: Path, report: dict[str, Any], console: Console) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")
