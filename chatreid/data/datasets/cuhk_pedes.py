"""CUHK-PEDES (text-based person search): ``reid_raw.json`` and ``imgs/<file_path>``.

Each JSON item is ``{"split", "captions", "file_path", "processed_tokens", "id"}``. Train records
carry their captions; test query records carry captions (the text side) and gallery records are the
same test images without captions. The dataset has no camera ids: ``camid`` is 0. Val items are
kept in ``.val``.
"""

from __future__ import annotations

import json

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord


class CUHKPEDES(ImageDataset):
    name = "cuhk_pedes"
    aliases = ("cuhk_pedes", "CUHK-PEDES")
    required = ("reid_raw.json", "imgs")

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        raw_path = self.dataset_dir / "reid_raw.json"
        try:
            items = json.loads(raw_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetLayoutError(f"{self.name}: malformed {raw_path}: {exc}") from exc
        splits: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
        for item in items:
            try:
                split, rel, pid = item["split"], item["file_path"], int(item["id"])
                captions = tuple(item["captions"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetLayoutError(f"{self.name}: bad item in {raw_path}: {item!r}") from exc
            path = self.require(self.dataset_dir / "imgs" / rel)
            if split not in splits:
                raise DatasetLayoutError(f"{self.name}: unknown split {split!r} in {raw_path}")
            splits[split].append(ImageRecord(path=path, pid=pid, camid=0, captions=captions))
        self.val = splits["val"]
        test = splits["test"]
        gallery = [ImageRecord(path=r.path, pid=r.pid, camid=r.camid) for r in test]
        return splits["train"], test, gallery
