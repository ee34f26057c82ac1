"""CUHK03, camera pair 1, in the flat ``cuhk03-pair1`` layout: ``train/`` and ``val/``, each
of ``NNNN_KK.jpg`` images (``NNNN`` the person, ``KK`` 00-04 camera A, 05-09 camera B).

Not the official ``cuhk-03.mat`` nor CUHK03-NP (read those with ``CUHK03``). ``train/`` and
``val/`` are numbered separately and hold different people, so validation pids are offset by
``VAL_PID_OFFSET`` (val ``0007`` is pid 10007): train and query/gallery never share a pid value,
and a pid still reads back to its file name. ``train`` is every ``train/`` image (both
cameras); ``direction`` picks the test pairing: "a2b" (query = val camera A, gallery = val
camera B) or "b2a". Cameras: A 0, B 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord

_NAME = re.compile(r"^(\d{4})_(\d{2})$")
VAL_PID_OFFSET = 10_000  # above any 4-digit train id
CAMERA_B_FIRST = 5  # KK 05-09 are camera B


class CUHK03Pair1(ImageDataset):
    name = "cuhk03_pair1"
    aliases = ("cuhk03-pair1", "cuhk03_pair1")
    required = ("train", "val")

    def __init__(self, root, direction: Literal["a2b", "b2a"] = "a2b") -> None:
        if direction not in ("a2b", "b2a"):
            raise ValueError("direction must be 'a2b' or 'b2a'")
        self.direction = direction
        super().__init__(root)

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        train = self._parse(self.dataset_dir / "train", 0)
        val = self._parse(self.dataset_dir / "val", VAL_PID_OFFSET)
        cam_a = [r for r in val if r.camid == 0]
        cam_b = [r for r in val if r.camid == 1]
        return (train, cam_a, cam_b) if self.direction == "a2b" else (train, cam_b, cam_a)

    def _parse(self, folder: Path, offset: int) -> list[ImageRecord]:
        if not folder.is_dir():
            raise DatasetLayoutError(f"{self.name}: missing folder {folder}")
        return [self._record(path, offset) for path in self.images(folder)]

    def _record(self, path: Path, offset: int) -> ImageRecord:
        m = _NAME.match(path.stem)
        if m is None or int(m.group(2)) > 9:
            raise DatasetLayoutError(f"{self.name}: unexpected file name {path} "
                                     "(expected NNNN_KK.jpg, KK 00-09)")
        pid, shot = int(m.group(1)), int(m.group(2))
        return ImageRecord(path=path, pid=pid + offset, camid=int(shot >= CAMERA_B_FIRST))
