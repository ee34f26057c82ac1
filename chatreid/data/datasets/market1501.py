"""Market-1501: ``bounding_box_train/``, ``bounding_box_test/``, ``query/``.

Names are ``PPPP_cCsS_FFFFFF_NN.jpg``; pid ``-1`` marks junk detections (skipped, as in
torchreid) and ``0000`` distractors (kept in the gallery).
"""

from __future__ import annotations

import re
from pathlib import Path

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord

_NAME = re.compile(r"^([-\d]+)_c(\d+)")


class Market1501(ImageDataset):
    name = "market1501"
    aliases = ("market1501", "Market-1501-v15.09.15")
    required = ("bounding_box_train", "bounding_box_test", "query")

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        d = self.dataset_dir
        return (
            self._parse(d / "bounding_box_train"),
            self._parse(d / "query"),
            self._parse(d / "bounding_box_test"),
        )

    def _parse(self, folder: Path) -> list[ImageRecord]:
        records = []
        for path in self.images(folder):
            m = _NAME.match(path.name)
            if m is None:
                raise DatasetLayoutError(f"{self.name}: unexpected file name {path}")
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:
                continue  # junk detections are ignored
            records.append(ImageRecord(path=path, pid=pid, camid=cam - 1))
        return records
