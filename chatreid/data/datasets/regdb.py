"""RegDB (visible-thermal): ``Visible/``, ``Thermal/`` and ``idx/{train,test}_{visible,thermal}
_{trial}.txt`` for trials 1-10; each line is ``<relative path> <label>``.

``direction`` picks the test pairing: "visible2thermal" (query = visible test images, gallery
= thermal) or "thermal2visible". Cameras: visible 0, thermal 1.
"""

from __future__ import annotations

from typing import Literal

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord

TRIALS = range(1, 11)


class RegDB(ImageDataset):
    name = "regdb"
    aliases = ("regdb", "RegDB")
    required = ("idx", "Visible", "Thermal")

    def __init__(self, root, trial: int = 1,
                 direction: Literal["visible2thermal", "thermal2visible"] = "visible2thermal"
                 ) -> None:
        if trial not in TRIALS:
            raise ValueError("trial must be 1..10")
        if direction not in ("visible2thermal", "thermal2visible"):
            raise ValueError("direction must be 'visible2thermal' or 'thermal2visible'")
        self.trial, self.direction = trial, direction
        super().__init__(root)

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        train = self._list("train", "visible") + self._list("train", "thermal")
        visible, thermal = self._list("test", "visible"), self._list("test", "thermal")
        if self.direction == "visible2thermal":
            return train, visible, thermal
        return train, thermal, visible

    def _list(self, split: str, spectrum: str) -> list[ImageRecord]:
        listing = self.require(self.dataset_dir / "idx" / f"{split}_{spectrum}_{self.trial}.txt")
        records = []
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rel, label = line.split()
                pid = int(label)
            except ValueError as exc:
                raise DatasetLayoutError(f"{self.name}: bad line {n} in {listing}: "
                                         f"{line!r}") from exc
            path = self.require(self.dataset_dir / rel)
            records.append(ImageRecord(path=path, pid=pid, camid=int(spectrum == "thermal"),
                                       modality="infrared" if spectrum == "thermal" else "rgb"))
        return records
