"""The settings reference, generated from :class:`chatreid.config.Settings` (one source).

``python -m chatreid.config_reference`` rewrites ``docs/configuration.md`` (every setting: its
variable, type, default, Helm value and description; secrets marked) and the generated part of
``.env.example`` (below its ``# --- chatreid settings`` line; the compose part above it is
written by hand). ``--check`` only reports what is stale (tests/test_config.py runs the same
check in CI). The Helm column is read from the chart's templates, so a template that sets a
variable which is no setting, or a setting renamed without the chart, shows up here and fails
the test.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from chatreid.config import (
    COMPOSE_VARIABLES,
    ENV_PREFIX,
    Settings,
    env_name,
    secret_paths,
    setting_paths,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"
TEMPLATES = ROOT / "helm" / "chatreid" / "templates"
ENV_MARKER = "# --- chatreid settings"
_WIDTH = 100


# -- one setting ---------------------------------------------------------------------------------
def field_info(path: tuple[str, ...]) -> FieldInfo:
    if len(path) == 1:
        return Settings.model_fields[path[0]]
    section = Settings.model_fields[path[0]].annotation
    assert isinstance(section, type) and issubclass(section, BaseModel)
    return section.model_fields[path[1]]


def type_name(annotation: Any) -> str:
    """A type the way an operator reads it: ``int``, ``str | None``, ``'cpu' | 'cuda'``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "None"
    if annotation is SecretStr:
        return "secret str"
    return getattr(annotation, "__name__", str(annotation))


def bounds(info: FieldInfo) -> str:
    marks = {Ge: ">=", Gt: ">", Le: "<=", Lt: "<"}
    out = []
    for meta in info.metadata:
        for kind, mark in marks.items():
            if isinstance(meta, kind):
                out.append(f"{mark} {getattr(meta, kind.__name__.lower())}")
    return ", ".join(out)


def default_of(info: FieldInfo) -> Any:
    return info.default_factory() if info.default_factory else info.default  # pyright: ignore[reportCallIssue]  (pydantic types it as taking the data too)


def env_value(value: Any) -> str:
    """A value as the environment (and .env) spells it; None: empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return str(value)


# -- the Helm chart's mapping --------------------------------------------------------------------
_ALIAS = re.compile(r"\$(\w+)\s*:=\s*(?:\.Values|\$root\.Values)((?:\.\w+)*)")
_SET = re.compile(r'(?:set \$\w+|"name") "(CHATREID_\w+)"(.*)')
_NAME = re.compile(r"-\s*name:\s*(CHATREID_\w+)\s*$")


def helm_mapping(templates: Path = TEMPLATES) -> dict[str, str]:
    """CHATREID_* variable -> what sets it in the chart: a values path, a Secret key or a
    fixed value. Read from the templates' ``set $d "CHATREID_..."``, ``dict "name"
    "CHATREID_..."`` and ``- name: CHATREID_...`` lines."""
    found: dict[str, str] = {}
    for path in sorted(templates.glob("*")):
        lines = path.read_text().splitlines()
        aliases: dict[str, str] = {}
        for i, line in enumerate(lines):
            for var, sub in _ALIAS.findall(line):
                aliases[var] = sub.lstrip(".")
            if m := _SET.search(line):
                before = lines[i - 1] if i else ""
                guard = before if re.search(r"\{\{-?\s*(if|with) ", before) else ""
                found.setdefault(m[1], _source(m[2], aliases, guard))
            elif m := _NAME.search(line):
                found.setdefault(m[1], _env_source(lines[i + 1:i + 6], aliases))
    return found


def _values_path(text: str, aliases: dict[str, str]) -> str | None:
    for var, rest in re.findall(r"\$(\w+)((?:\.\w+)+)", text):
        if var in aliases:
            return ".".join(p for p in (aliases[var], rest.lstrip(".")) if p)
    return None


def _source(expr: str, aliases: dict[str, str], guard: str) -> str:
    """The values path of a ``set``'s expression; else (``{{ with $v.x }}``, ``{{ if $v.x }}``
    on the line before) the guard's; else the literal it sets."""
    values = _values_path(expr, aliases)
    if values:
        return f"`{values}`"
    literal = re.match(r'\s*"([^"]*)"', expr)
    if guard and (values := _values_path(guard, aliases)):
        return f"`{values}`" + (f" (`{literal[1]}` when set)" if literal else "")
    return f"fixed `{literal[1]}`" if literal else "chart"


def _env_source(following: list[str], aliases: dict[str, str]) -> str:
    for line in following:
        if m := re.search(r"value:\s*(\S+)", line):
            return f"fixed `{m[1]}`"
        if "key:" in line and (values := _values_path(line, aliases)):
            return f"Secret (key `{values}`)"
        if _NAME.search(line):
            break
    return "chart"


# -- docs/configuration.md -----------------------------------------------------------------------
_DOC_HEAD = """\
# Configuration

<!-- Generated from chatreid/config.py by `python -m chatreid.config_reference`; do not edit.
     tests/test_config.py fails when this file is stale. -->

Every process reads one `Settings` object (`chatreid/config.py`) from environment variables
named `CHATREID_<GROUP>__<NAME>` (an ungrouped setting: `CHATREID_<NAME>`). Sources, first wins:

1. the environment;
2. `.env` in the working directory (copy `.env.example`; docker compose reads it too);
3. `<stack.data_dir>/credentials.env`: the secrets `chatreid up` generated for the local stack
   (owner-only), for values configured nowhere else;
4. the defaults below (they point at the local stack on 127.0.0.1).

A list is written as JSON (`CHATREID_ACCESS__ALLOWED_ORIGINS='["https://console.example"]'`), a
boolean as `true`/`false`, "none" by leaving the variable unset. A `CHATREID_*` variable that is
no setting (a typo) is ignored with a warning naming the closest setting.

**Secrets** (marked 🔒, typed `SecretStr`) have no default, are never printed, logged or part of
a Serve or Ray Train config (`chatreid.cluster.share` passes them through the cluster's internal
KV), and are read only where they are used.

**Helm**: the column says which chart value sets a variable (`helm/chatreid/values.yaml`), or the
Secret it comes from, or the fixed value the chart gives it; any other setting can be given as
`extraConfig: {CHATREID_<GROUP>__<NAME>: "value"}`. docker compose: `.env` (every line is passed
into the chatreid containers).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference(helm: dict[str, str] | None = None) -> str:
    helm = helm_mapping() if helm is None else helm
    secrets = {env_name(*p) for p in secret_paths()}
    out = [_DOC_HEAD]
    groups: dict[str, list[tuple[str, ...]]] = {}
    for path in setting_paths():
        groups.setdefault(path[0] if len(path) == 2 else "", []).append(path)
    for group, paths in groups.items():
        if group:
            doc = (Settings.model_fields[group].annotation.__doc__ or "").strip()
            out.append(f"\n## `{group}`\n\n{' '.join(doc.split())}\n" if doc
                       else f"\n## `{group}`\n")
        else:
            out.append("\n## General\n")
        out.append("| Variable | Type | Default | Helm | Description |")
        out.append("| --- | --- | --- | --- | --- |")
        for path in paths:
            info, name = field_info(path), env_name(*path)
            kind = type_name(info.annotation)
            if limit := bounds(info):
                kind += f" ({limit})"
            default = env_value(default_of(info))
            lock = "🔒 " if name in secrets else ""
            out.append(f"| {lock}`{name}` | {_cell(kind)} | "
                       f"{_cell(f'`{default}`' if default else 'unset')} | "
                       f"{_cell(helm.get(name, 'extraConfig'))} | "
                       f"{_cell(info.description or '')} |")
    return "\n".join(out) + "\n"


# -- .env.example ----------------------------------------------------------------------------------
_ENV_HEAD = f"""\
{ENV_MARKER} {'-' * (_WIDTH - len(ENV_MARKER) - 2)}
# Generated from chatreid/config.py by `python -m chatreid.config_reference`: edit the
# descriptions there, never below this line. Each value is the default; uncomment what you
# change. The reference with types and the Helm values: docs/configuration.md.
"""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), _WIDTH - 2, initial_indent="# ",
                         subsequent_indent="# ", break_on_hyphens=False)


def render_env_example(current: str) -> str:
    """``current`` with everything from the marker line on regenerated; variables the
    hand-written part above already documents (the compose secrets) are not repeated."""
    hand = current.split(ENV_MARKER, 1)[0].rstrip("\n") + "\n\n"
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", hand, re.M))
    out = [_ENV_HEAD]
    group = None
    for path in setting_paths():
        name = env_name(*path)
        if name in documented:
            continue
        if len(path) == 2 and path[0] != group:
            group = path[0]
            doc = (Settings.model_fields[group].annotation.__doc__ or "").strip()
            out.append(f"\n# [{group}]" + (f" {' '.join(doc.split())}" if doc else ""))
        info = field_info(path)
        out += _comment(info.description or "")
        out.append(f"#{name}={env_value(default_of(info))}")
    return hand + "\n".join(out) + "\n"


# -- checks ----------------------------------------------------------------------------------------
def unknown_names(text: str) -> set[str]:
    """CHATREID_* names in ``text`` that are neither a setting nor a compose variable."""
    from chatreid.config import known_variables

    return set(re.findall(rf"{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]", text)) - known_variables()


def stale() -> list[str]:
    """The generated files that differ from what the settings give (empty: all current)."""
    out = []
    if not DOC.exists() or DOC.read_text() != render_reference():
        out.append(str(DOC.relative_to(ROOT)))
    current = ENV_EXAMPLE.read_text()
    if ENV_MARKER not in current or current != render_env_example(current):
        out.append(str(ENV_EXAMPLE.relative_to(ROOT)))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        old = stale()
        for path in old:
            print(f"{path} is stale: run `python -m chatreid.config_reference`", file=sys.stderr)
        return 1 if old else 0
    DOC.write_text(render_reference())
    ENV_EXAMPLE.write_text(render_env_example(ENV_EXAMPLE.read_text()))
    print(f"wrote {DOC.relative_to(ROOT)} and {ENV_EXAMPLE.relative_to(ROOT)}")
    return 0


__all__ = ["COMPOSE_VARIABLES", "helm_mapping", "render_env_example", "render_reference",
           "stale", "unknown_names"]

if __name__ == "__main__":
    raise SystemExit(main())
