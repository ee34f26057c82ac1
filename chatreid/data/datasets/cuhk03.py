"""CUHK03 under the new 767/700 protocol, in the CUHK03-NP layout: ``labeled/`` (hand-drawn
boxes) and ``detected/`` (DPM boxes), each with Market-1501's ``bounding_box_train/``,
``bounding_box_test/``, ``query/`` and ``PPPP_cC_...`` names. (The original ``cuhk-03.mat``
release is not read; CUHK03-NP is how the new protocol is distributed.)
"""

from __future__ import annotations

from typing import Literal

from chatreid.data.datasets.base import ImageDataset, ImageRecord
from chatreid.data.datasets.market1501 import Market1501


class CUHK03(ImageDataset):
    name = "cuhk03"
    aliases = ("cuhk03-np", "cuhk03_np", "cuhk03", "CUHK03-NP")
    required = ("labeled", "detected")

    def __init__(self, root, variant: Literal["labeled", "detected"] = "labeled") -> None:
        if variant not in ("labeled", "detected"):
            raise ValueError("variant must be 'labeled' or 'detected'")
        self.variant = variant
        super().__init__(root)

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        market = Market1501(self.dataset_dir / self.variant)  # same names, same rules
        return market.train, market.query, market.gallery
