"""Datasets: readers of on-disk benchmark layouts."""

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

__all__ = [
    "CUHKPEDES",
    "DATASETS",
    "LTCC",
    "SYSUMM01",
    "DatasetLayoutError",
    "ImageDataset",
    "ImageRecord",
    "Market1501",
]
