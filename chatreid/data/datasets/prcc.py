"""PRCC (cloth-changing): ``rgb/train/<pid>/``, ``rgb/val/<pid>/``, ``rgb/test/{A,B,C}/<pid>/``.

Camera is the file name's first letter (train, val) or the test folder: A and B show a person
in the same clothes, C in other clothes. Test: gallery = camera A; ``query_same`` = camera B
(same clothes), ``query_changed`` = camera C (changed clothes); ``query`` is the
``setting`` chosen ("changed" by default, the benchmark's headline). Clothes ids: A and B
share ``2 * pid``, C has ``2 * pid + 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord

_CAMS = {"A": 0, "B": 1, "C": 2}


class PRCC(ImageDataset):
    name = "prcc"
    aliases = ("prcc", "PRCC")
    required = ("rgb/train", "rgb/test/A", "rgb/test/B", "rgb/test/C")

    def __init__(self, root, setting: Literal["changed", "same"] = "changed") -> None:
        if setting not in ("changed", "same"):
            raise ValueError("setting must be 'changed' or 'same'")
        self.setting = setting
        super().__init__(root)

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        rgb = self.dataset_dir / "rgb"
        train = self._by_name(rgb / "train")
        self.val = self._by_name(rgb / "val") if (rgb / "val").is_dir() else []
        gallery = self._by_folder(rgb / "test" / "A", "A")
        self.query_same = self._by_folder(rgb / "test" / "B", "B")
        self.query_changed = self._by_folder(rgb / "test" / "C", "C")
        query = self.query_changed if self.setting == "changed" else self.query_same
        return train, query, gallery

    def _record(self, path: Path, pid: int, cam: str) -> ImageRecord:
        return ImageRecord(path=path, pid=pid, camid=_CAMS[cam],
                           clothes_id=2 * pid + (cam == "C"))

    def _by_name(self, folder: Path) -> list[ImageRecord]:
        records = []
        for person in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in self.images(person):
                cam = path.name[:1]
                if cam not in _CAMS or not person.name.isdigit():
                    raise DatasetLayoutError(f"{self.name}: unexpected file {path}")
                records.append(self._record(path, int(person.name), cam))
        return records

    def _by_folder(self, folder: Path, cam: str) -> list[ImageRecord]:
        records = []
        for person in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not person.name.isdigit():
                raise DatasetLayoutError(f"{self.name}: unexpected folder {person}")
            records += [self._record(p, int(person.name), cam) for p in self.images(person)]
        return records
