"""Readers of the benchmark layouts (torchreid style: a dataset parses its folder into records)."""

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord
from chatreid.data.datasets.cuhk_pedes import CUHKPEDES
from chatreid.data.datasets.ltcc import LTCC
from chatreid.data.datasets.market1501 import Market1501
from chatreid.data.datasets.sysu_mm01 import SYSUMM01

DATASETS: dict[str, type[ImageDataset]] = {
    "market1501": Market1501,
    "ltcc": LTCC,
    "sysu_mm01": SYSUMM01,
    "cuhk_pedes": CUHKPEDES,
}

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
