"""The queries of a task: a query crop, a text clue, or both (multimodal).

* image kinds (standard, cloth-changing, visible-infrared): the reader's query records;
* text-to-image: one query per caption of each test image (the benchmarks' convention);
* attribute (synthetic): the salient attributes of a test crop (gender, garment types and
  colours) from the world's ``attributes/attributes.json``;
* multimodal (synthetic; the paper's adaptive query): an LTCC query crop plus a caption of
  the same person in *another* outfit from the gallery, drawn with a seeded generator; a
  query whose person never changes clothes in the gallery has no such clue and is left out
  (it would be skipped by the cloth-changing protocol anyway).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from chatreid.data.datasets import ImageDataset, ImageRecord
from chatreid.data.datasets.base import DatasetLayoutError
from chatreid.data.instructions.samples import SALIENT_FIELDS, canonical_attributes
from chatreid.evaluation.tasks import EvalTask
from chatreid.rerank import attribute_text
from schemas.api import QueryKind

ATTRIBUTES_FILE = Path("attributes") / "attributes.json"


@dataclass(frozen=True)
class EvalQuery:
    record: ImageRecord  # identity/camera/clothes labels; its image when the kind has one
    text: str | None = None  # the clue the VLM reads
    clue: str | Mapping[str, str] | None = None  # what the text prefilter parses


def build_queries(task: EvalTask, ds: ImageDataset, root: Path, seed: int = 0
                  ) -> list[EvalQuery]:
    if task.kind == "text_to_image":
        return _caption_queries(task, ds.query)
    if task.kind == "attribute":
        return [_attribute_query(r, _annotation(root, r)) for r in ds.query]
    if task.kind is QueryKind.MULTIMODAL:
        return _multimodal_queries(ds, root, seed)
    return [EvalQuery(r) for r in ds.query]


def _caption_queries(task: EvalTask, records: Sequence[ImageRecord]) -> list[EvalQuery]:
    out = [EvalQuery(r, c, c) for r in records for c in r.captions]
    if records and not out:
        raise DatasetLayoutError(f"{task.name}: the test split has no captions")
    return out


def _attribute_query(record: ImageRecord, annotation: Mapping[str, Any]) -> EvalQuery:
    attrs = canonical_attributes(annotation)
    query = {f: attrs[f] for f in SALIENT_FIELDS}
    return EvalQuery(record, attribute_text(query), query)


def _multimodal_queries(ds: ImageDataset, root: Path, seed: int) -> list[EvalQuery]:
    from chatreid.synth.world import make_captions

    out = []
    for i, q in enumerate(ds.query):
        others = [g for g in ds.gallery if g.pid == q.pid and g.clothes_id != q.clothes_id]
        if not others:
            continue
        rng = np.random.default_rng([seed, i])
        target = others[int(rng.integers(len(others)))]
        caption = make_captions(dict(_annotation(root, target)), rng, 1)[0]
        out.append(EvalQuery(q, caption, caption))
    return out


def _annotation(root: Path, record: ImageRecord) -> Mapping[str, Any]:
    table = _annotations(Path(root).resolve())
    key = str(Path(record.path).resolve().relative_to(Path(root).resolve()))
    try:
        return table[key]["attributes"]
    except KeyError as exc:
        raise DatasetLayoutError(f"{root / ATTRIBUTES_FILE} has no attributes for {key}") from exc


@lru_cache(maxsize=2)
def _annotations(root: Path) -> dict[str, Any]:
    path = root / ATTRIBUTES_FILE
    if not path.is_file():
        raise DatasetLayoutError(
            "attribute and multimodal tasks need the synthetic world's annotations: "
            f"missing {path}")
    return json.loads(path.read_text())
