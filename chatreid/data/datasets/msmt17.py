"""MSMT17: ``train/`` and ``test/`` image folders with ``list_{train,val,query,gallery}.txt``.

Each list line is ``<pid folder>/<file> <pid>``; the file name's third field is the camera
(``0000_000_01_0303morning_0015_0.jpg`` -> camera 1). Train uses the train and val lists. The
V2 release's ``mask_train_v2`` / ``mask_test_v2`` folders are read the same way.
"""

from __future__ import annotations

from pathlib import Path

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord


class MSMT17(ImageDataset):
    name = "msmt17"
    aliases = ("msmt17", "MSMT17_V1", "MSMT17_V2", "MSMT17")
    required = ("list_train.txt", "list_query.txt", "list_gallery.txt")

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        d = self.dataset_dir
        train_dir = d / "train" if (d / "train").is_dir() else d / "mask_train_v2"
        test_dir = d / "test" if (d / "test").is_dir() else d / "mask_test_v2"
        self.require(train_dir)
        self.require(test_dir)
        train = self._parse(train_dir, d / "list_train.txt")
        if (d / "list_val.txt").exists():
            train += self._parse(train_dir, d / "list_val.txt")
        return (train, self._parse(test_dir, d / "list_query.txt"),
                self._parse(test_dir, d / "list_gallery.txt"))

    def _parse(self, folder: Path, listing: Path) -> list[ImageRecord]:
        records = []
        for n, line in enumerate(self.require(listing).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rel, pid = line.split()
                cam = int(Path(rel).name.split("_")[2])
            except (ValueError, IndexError) as exc:
                raise DatasetLayoutError(f"{self.name}: bad line {n} in {listing}: "
                                         f"{line!r}") from exc
            path = self.require(folder / rel)
            records.append(ImageRecord(path=path, pid=int(pid), camid=cam - 1))
        return records
