"""Datasets: readers of on-disk benchmark layouts, and the instruction data engine that builds
the three tuning stages' datasets into object storage (``engine``, ``worlds``, ``report``)."""

from chatreid.data.build import (
    CorruptShardError,
    DatasetError,
    DatasetManifest,
    InstructionDatasetSpec,
    build_dataset,
    iter_samples,
    load_manifest,
    load_report,
    shards_for_worker,
)
from chatreid.data.datasets import (
    CUHKPEDES,
    DATASETS,
    LTCC,
    SYSUMM01,
    DatasetLayoutError,
    ImageDataset,
    ImageRecord,
    Market1501,
)
from chatreid.data.report import DatasetReport, render_report
from chatreid.data.worlds import ImageResolver, WorldError, resolve_image, upload_world, world_id

__all__ = [
    "CUHKPEDES",
    "DATASETS",
    "LTCC",
    "SYSUMM01",
    "CorruptShardError",
    "DatasetError",
    "DatasetLayoutError",
    "DatasetManifest",
    "DatasetReport",
    "ImageDataset",
    "ImageRecord",
    "ImageResolver",
    "InstructionDatasetSpec",
    "Market1501",
    "WorldError",
    "build_dataset",
    "iter_samples",
    "load_manifest",
    "load_report",
    "render_report",
    "resolve_image",
    "shards_for_worker",
    "upload_world",
    "world_id",
]
