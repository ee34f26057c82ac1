"""What is evaluated: a benchmark task = a reader (with its options), a protocol, a query kind.

``BENCHMARKS`` are the paper's ten benchmarks in their official layouts (under one root, each
in its usual folder name), plus ``cuhk03_pair1`` (CUHK03 camera pair 1's validation people in
the flat ``cuhk03-pair1`` layout: queries camera A, gallery camera B and the reverse,
averaged); ``SYNTHETIC`` is the same tasks on the synthetic world's held-out
identities plus the two the benchmarks lack: attribute-based retrieval (the query is a few
attributes of a test crop, from ``attributes/attributes.json``) and multimodal retrieval (the
paper's "adaptive multi-modal retrieval": an LTCC query image plus a description of the
person's *other* outfit, as in stage 3's adaptive task, scored cloth-changing; results stored
before the rename call it ``synth_adaptive``, see :data:`TASK_ALIASES`). Trials (RegDB's ten
splits, SYSU-MM01's ten gallery draws) are part of a task. How each query's clue is made:
``chatreid.evaluation.queries``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatreid.data.datasets import DATASETS, ImageDataset
from schemas.api import QueryKind


@dataclass(frozen=True)
class EvalTask:
    name: str
    dataset: str  # key of chatreid.data.datasets.DATASETS
    protocol: str  # key of chatreid.metrics.PROTOCOLS
    kind: QueryKind  # what a query of this task carries (an image, a text clue, both)
    task: str  # the paper's task family, for the report's tables
    options: dict[str, Any] = field(default_factory=dict)  # reader keyword arguments
    trials: tuple[dict[str, Any], ...] = ()  # per-trial reader options, averaged
    gallery_draws: int = 0  # SYSU-MM01: single-shot gallery draws per trial (0: whole)
    indoor: bool = False  # SYSU-MM01 indoor search: gallery cameras 1 and 2 only

    def load(self, root, **extra) -> ImageDataset:
        return DATASETS[self.dataset](root, **{**self.options, **extra})

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", QueryKind.parse(self.kind))

    @property
    def image_query(self) -> bool:
        """The query has an image (:attr:`QueryKind.has_image`)."""
        return self.kind.has_image

    @property
    def text_query(self) -> bool:
        """The query has a text clue (:attr:`QueryKind.has_text`)."""
        return self.kind.has_text


_REGDB = tuple({"trial": t} for t in range(1, 11))
# Camera pair 1 of CUHK03 (real people, ``../shared``): A -> B and B -> A, averaged.
_CUHK03_PAIR1 = ({"direction": "a2b"}, {"direction": "b2a"})

BENCHMARKS: dict[str, EvalTask] = {t.name: t for t in (
    EvalTask("market1501", "market1501", "market1501", QueryKind.STANDARD, "standard"),
    EvalTask("msmt17", "msmt17", "msmt17", QueryKind.STANDARD, "standard"),
    EvalTask("cuhk03_labeled", "cuhk03", "cuhk03", QueryKind.STANDARD, "standard",
             {"variant": "labeled"}),
    EvalTask("cuhk03_detected", "cuhk03", "cuhk03", QueryKind.STANDARD, "standard",
             {"variant": "detected"}),
    EvalTask("cuhk03_pair1", "cuhk03_pair1", "market1501", QueryKind.STANDARD, "standard",
             trials=_CUHK03_PAIR1),
    EvalTask("ltcc_cc", "ltcc", "ltcc_cc", QueryKind.CLOTH_CHANGING, "cloth_changing"),
    EvalTask("ltcc_general", "ltcc", "ltcc_general", QueryKind.CLOTH_CHANGING, "cloth_changing"),
    EvalTask("prcc_cc", "prcc", "prcc", QueryKind.CLOTH_CHANGING, "cloth_changing",
             {"setting": "changed"}),
    EvalTask("prcc_same", "prcc", "prcc", QueryKind.CLOTH_CHANGING, "cloth_changing",
             {"setting": "same"}),
    EvalTask("sysu_all", "sysu_mm01", "sysu_mm01", QueryKind.VISIBLE_INFRARED, "visible_infrared",
             gallery_draws=10),
    EvalTask("sysu_indoor", "sysu_mm01", "sysu_mm01", QueryKind.VISIBLE_INFRARED,
             "visible_infrared", gallery_draws=10, indoor=True),
    EvalTask("regdb_v2t", "regdb", "regdb", QueryKind.VISIBLE_INFRARED, "visible_infrared",
             {"direction": "visible2thermal"}, trials=_REGDB),
    EvalTask("regdb_t2v", "regdb", "regdb", QueryKind.VISIBLE_INFRARED, "visible_infrared",
             {"direction": "thermal2visible"}, trials=_REGDB),
    EvalTask("cuhk_pedes", "cuhk_pedes", "text", QueryKind.TEXT_TO_IMAGE, "text_to_image"),
    EvalTask("icfg_pedes", "icfg_pedes", "text", QueryKind.TEXT_TO_IMAGE, "text_to_image"),
    EvalTask("rstpreid", "rstpreid", "text", QueryKind.TEXT_TO_IMAGE, "text_to_image"),
)}

SYNTHETIC: dict[str, EvalTask] = {t.name: t for t in (
    EvalTask("synth_standard", "market1501", "market1501", QueryKind.STANDARD, "standard"),
    EvalTask("synth_cloth_changing", "ltcc", "ltcc_cc", QueryKind.CLOTH_CHANGING, "cloth_changing"),
    EvalTask("synth_visible_infrared", "sysu_mm01", "sysu_mm01", QueryKind.VISIBLE_INFRARED,
             "visible_infrared"),
    EvalTask("synth_text_to_image", "cuhk_pedes", "text", QueryKind.TEXT_TO_IMAGE, "text_to_image"),
    EvalTask("synth_attribute", "cuhk_pedes", "text", QueryKind.ATTRIBUTE, "attribute"),
    EvalTask("synth_multimodal", "ltcc", "ltcc_cc", QueryKind.MULTIMODAL, "multimodal"),
)}

# Task names stored results and scripts may still use -> today's name.
TASK_ALIASES = {"synth_adaptive": "synth_multimodal"}
