"""Readers of the benchmark layouts (torchreid style: a dataset parses its folder into records)."""

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord
from chatreid.data.datasets.cuhk03 import CUHK03
from chatreid.data.datasets.cuhk03_pair1 import CUHK03Pair1
from chatreid.data.datasets.cuhk_pedes import CUHKPEDES, ICFGPEDES, RSTPReid, TextDataset
from chatreid.data.datasets.ltcc import LTCC
from chatreid.data.datasets.market1501 import Market1501
from chatreid.data.datasets.msmt17 import MSMT17
from chatreid.data.datasets.prcc import PRCC
from chatreid.data.datasets.regdb import RegDB
from chatreid.data.datasets.sysu_mm01 import SYSUMM01

DATASETS: dict[str, type[ImageDataset]] = {
    "market1501": Market1501,
    "msmt17": MSMT17,
    "cuhk03": CUHK03,
    "cuhk03_pair1": CUHK03Pair1,
    "ltcc": LTCC,
    "prcc": PRCC,
    "sysu_mm01": SYSUMM01,
    "regdb": RegDB,
    "cuhk_pedes": CUHKPEDES,
    "icfg_pedes": ICFGPEDES,
    "rstpreid": RSTPReid,
}

__all__ = [
    "CUHK03",
    "CUHKPEDES",
    "DATASETS",
    "ICFGPEDES",
    "LTCC",
    "MSMT17",
    "PRCC",
    "SYSUMM01",
    "CUHK03Pair1",
    "DatasetLayoutError",
    "ImageDataset",
    "ImageRecord",
    "Market1501",
    "RSTPReid",
    "RegDB",
    "TextDataset",
]
