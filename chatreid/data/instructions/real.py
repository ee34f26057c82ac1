"""Real people in identity-only instruction tasks (off unless a spec sets ``real``).

Some tasks need nothing but person ids and cameras: stage 2's image-image tasks
(``ii_one_to_one``, ``ii_many_to_many``) and stage 3's ``standard`` best-choice Re-ID. With
``RealImages`` set, each such sample draws *all* its images from the real training split
(``cuhk03_pair1``'s ``train/``, read by ``chatreid.data.datasets``) with probability ``share``,
else from the synthetic world as before; a sample never mixes both, so "real vs rendered" is
never a shortcut to the answer. Every other task (attribute captioning, text-image,
attribute, cloth-changing, visible-infrared, multimodal) needs attribute labels, captions,
clothes ids or modalities that the real set lacks, so it stays synthetic-only.

Real samples carry ``meta["source"]`` (the dataset name); their pids are offset by
``REAL_PID_OFFSET`` so the stats report never counts a real person as a synthetic one. In a
built dataset their images are ``real:<dataset>/<path in the dataset folder>`` (see
``chatreid.data.worlds.real_relpath``): the images are never uploaded; every machine that
builds or trains reads them from its own copy of the real folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatreid.data.datasets import DATASETS, ImageDataset, ImageRecord
from chatreid.data.instructions.samples import ImageEntry, InstructionSample

# Stage -> the identity-only tasks that may draw real images.
REAL_TASKS: dict[int, tuple[str, ...]] = {
    2: ("ii_one_to_one", "ii_many_to_many"),
    3: ("standard",),
}
REAL_PID_OFFSET = 1_000_000  # above any synthetic pid
UNKNOWN_CLOTHES = -1  # real sets have no outfit labels


class RealImages(BaseModel):
    """Where the real images are and how many identity-only samples use them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: Path  # the dataset folder or a parent holding it (the reader's aliases)
    dataset: Literal["cuhk03_pair1"] = "cuhk03_pair1"
    share: float = Field(0.5, gt=0.0, le=1.0)  # of identity-only samples; the rest synthetic

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: Path) -> Path:
        return root.expanduser().absolute()  # Ray workers need not share the driver's cwd

    def reader(self) -> ImageDataset:
        # Read afresh each time (a few ms per thousand files): a changed set must change the id.
        return DATASETS[self.dataset](self.root)

    def files_digest(self) -> str:
        """Hash of the training files (relative path and size): a changed set is another
        dataset, wherever the folder lies."""
        ds = self.reader()
        digest = hashlib.sha256()
        for r in ds.train:
            rel = r.path.relative_to(ds.dataset_dir).as_posix()
            digest.update(f"{rel}:{r.path.stat().st_size}\n".encode())
        return digest.hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        """What a dataset id hashes: the set's content and the share, never its location."""
        return {"dataset": self.dataset, "share": self.share, "files": self.files_digest()}


def _entry(name: str, dataset_dir: Path, r: ImageRecord) -> ImageEntry:
    rel = r.path.relative_to(dataset_dir).as_posix()
    return ImageEntry(
        path=str(r.path), relpath=rel, layout=name, pid=REAL_PID_OFFSET + r.pid,
        clothes_id=UNKNOWN_CLOTHES, camid=r.camid, modality=r.modality, split="train",
        bbox=(0, 0, 0, 0), attributes={}, captions=(), sighting=(name, rel),
    )


def real_entries(real: RealImages) -> list[ImageEntry]:
    """The real training split as builder entries (its validation people are never drawn)."""
    ds = real.reader()
    entries = [_entry(real.dataset, ds.dataset_dir, r) for r in ds.train]
    if not entries:
        raise ValueError(f"{real.dataset}: no training images under {ds.dataset_dir}")
    return entries


Builder = Callable[[np.random.Generator, Any, Any], InstructionSample | None]


def with_real(builders: Mapping[str, Builder], stage: int, real_pools: Any, share: float,
              source: str) -> dict[str, Builder]:
    """``builders`` with each identity-only task drawing from ``real_pools`` at ``share``."""
    out = dict(builders)
    for task in REAL_TASKS[stage]:
        out[task] = _mixed(builders[task], real_pools, share, source)
    return out


def _mixed(build: Builder, real_pools: Any, share: float, source: str) -> Builder:
    def draw(rng: np.random.Generator, pools: Any, cfg: Any) -> InstructionSample | None:
        if rng.random() >= share:
            return build(rng, pools, cfg)
        sample = build(rng, real_pools, cfg)
        if sample is None:
            return None
        return sample.model_copy(update={"meta": {**sample.meta, "source": source}})

    return draw
