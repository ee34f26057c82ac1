"""LTCC (cloth-changing): ``train/``, ``query/``, ``test/`` with ``PID_CLOTHES_cCAM_FRAME.png``.

Real LTCC images are PNG; ``.jpg`` is accepted too. ``clothes_id`` is the number in the name as is
(the synthetic world writes globally unique clothes ids there).
"""

from __future__ import annotations

import re
from pathlib import Path

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord

_NAME = re.compile(r"^(\d+)_(\d+)_c(\d+)")


class LTCC(ImageDataset):
    name = "ltcc"
    aliases = ("ltcc", "LTCC_ReID")
    required = ("train", "query", "test")

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        d = self.dataset_dir
        return self._parse(d / "train"), self._parse(d / "query"), self._parse(d / "test")

    def _parse(self, folder: Path) -> list[ImageRecord]:
        records = []
        for path in self.images(folder):
            m = _NAME.match(path.name)
            if m is None:
                raise DatasetLayoutError(f"{self.name}: unexpected file name {path}")
            pid, clothes, cam = (int(g) for g in m.groups())
            records.append(ImageRecord(path=path, pid=pid, camid=cam - 1, clothes_id=clothes))
        return records
