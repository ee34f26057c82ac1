"""Export every contract's JSON Schema into ``jsonschema/`` (one file per model)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.api import API_MODELS
from schemas.cards import CARD_MODELS
from schemas.console import CONSOLE_MODELS
from schemas.events import EVENT_MODELS

SCHEMA_DIR = Path(__file__).parent / "jsonschema"


def render_all() -> dict[str, str]:
    """File name -> JSON text, deterministic (sorted keys, trailing newline)."""
    out = {}
    for name, model in {**EVENT_MODELS, **API_MODELS, **CONSOLE_MODELS, **CARD_MODELS}.items():
        schema = model.model_json_schema()
        out[f"{name}.v1.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in render_all().items():
        path = directory / fname
        path.write_text(text)
        written.append(path)
    return written
