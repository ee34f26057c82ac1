"""The architecture as a test: the import contracts in ``.importlinter`` hold (layers, no
cycles, the core never imports a service, a job or the application layer), and the light
modules really import no ML framework when imported on their own."""

from __future__ import annotations

import configparser
import json
import pkgutil
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("schemas", "chatreid", "services", "ray_jobs")  # the root_packages


@cache
def contracts() -> dict[str, configparser.SectionProxy]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    prefix = "importlinter:contract:"
    return {name.removeprefix(prefix): parser[name] for name in parser.sections()
            if name.startswith(prefix)}


def lines(value: str) -> list[str]:
    return [v.strip() for v in value.splitlines() if v.strip()]


def lint_imports(cwd: Path, *contract: str) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    for c in contract:
        args += ["--contract", c]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(cwd)})


# -- (a) the contracts ----------------------------------------------------------------------

def test_every_layer_rule_is_a_contract() -> None:
    kinds = {c["type"] for c in contracts().values()}
    assert {"forbidden", "acyclic_siblings", "layers"} <= kinds
    assert "light" in contracts() and "core" in contracts() and "core-layers" in contracts()


@pytest.mark.parametrize("contract", sorted(contracts()))
def test_import_contract_is_kept(contract: str) -> None:
    """One contract per test, so a failure names the rule broken (and lint-imports says by
    which import). ``core`` also says no core module imports ``services``/``ray_jobs``."""
    run = lint_imports(ROOT, contract)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "KEPT" in run.stdout


def copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(CONFIG, dest / ".importlinter")
    return dest


@pytest.mark.parametrize(("module", "line", "contract"), [
    # serving's ranking reaching up into training: a layer broken
    ("chatreid/rerank/ranking.py", "import chatreid.tuning.presets", "core-layers"),
    # the embedder reaching up into evaluation again (the cycle this layout removed)
    ("chatreid/embedder/colour.py", "import chatreid.evaluation.tasks", "acyclic"),
    # a light module growing a heavy import
    ("chatreid/errors.py", "import torch", "light"),
    # the core importing a service
    ("chatreid/storage.py", "import services.ingestor", "core"),
])
def test_a_breaking_import_fails_the_contract(tmp_path: Path, module: str, line: str,
                                              contract: str) -> None:
    """The contracts can fail: the same tree plus one offending import is refused."""
    tree = copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    run = lint_imports(tree, contract)
    assert run.returncode != 0, run.stdout[-4000:]
    assert "BROKEN" in run.stdout


# -- (b) light modules, imported for real --------------------------------------------------

def light_modules() -> list[str]:
    """The light contract's modules, packages expanded to every module they hold."""
    out: list[str] = []
    for name in lines(contracts()["light"]["source_modules"]):
        path = ROOT / name.replace(".", "/")
        out.append(name)
        if path.is_dir():
            out += [m.name for m in pkgutil.walk_packages([str(path)], prefix=f"{name}.")]
    return sorted(set(out))


FORBIDDEN = tuple(lines(contracts()["light"]["forbidden_modules"]))


def heavy_loaded(module: str) -> list[str]:
    """The ML frameworks in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:]))))")
    run = subprocess.run([sys.executable, "-c", code, module, *FORBIDDEN], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_light_modules_cover_the_issue_list() -> None:
    light = set(light_modules())
    assert {"chatreid.access", "chatreid.sessions", "chatreid.client", "chatreid.config",
            "chatreid.errors", "schemas.api", "schemas.console"} <= light
    assert {"torch", "transformers", "ray", "faiss", "kafka", "onnxruntime",
            "deepspeed"} <= set(FORBIDDEN)


@pytest.mark.parametrize("module", light_modules())
def test_light_module_imports_no_ml_framework(module: str) -> None:
    assert heavy_loaded(module) == []


@pytest.mark.parametrize(("module", "framework"), [("chatreid.bus", "kafka"),
                                                   ("chatreid.embedder.colour", "torch")])
def test_the_check_sees_a_heavy_import(module: str, framework: str) -> None:
    """Control: a module that does load a framework is reported, so the test above can fail."""
    assert framework in heavy_loaded(module)
