"""Text-based person search: CUHK-PEDES, ICFG-PEDES, RSTPReid - one JSON annotation file and
an ``imgs/`` folder.

Each JSON item is ``{"split", "captions", <image path key>, "id", ...}`` (CUHK-PEDES
``reid_raw.json`` and ICFG-PEDES ``ICFG-PEDES.json`` say ``file_path``, RSTPReid
``data_captions.json`` says ``img_path``). Train records carry their captions; test query
records carry captions (the text side) and gallery records are the same test images without
captions. These datasets have no camera ids: ``camid`` is 0. Val items are kept in ``.val``.
"""

from __future__ import annotations

import json
from typing import ClassVar

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord


class TextDataset(ImageDataset):
    annotations: ClassVar[str] = ""
    path_key: ClassVar[str] = "file_path"

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        raw_path = self.dataset_dir / self.annotations
        try:
            items = json.loads(raw_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetLayoutError(f"{self.name}: malformed {raw_path}: {exc}") from exc
        splits: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
        for item in items:
            try:
                split, rel, pid = item["split"], item[self.path_key], int(item["id"])
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


class CUHKPEDES(TextDataset):
    name = "cuhk_pedes"
    aliases = ("cuhk_pedes", "CUHK-PEDES")
    required = ("reid_raw.json", "imgs")
    annotations = "reid_raw.json"


class ICFGPEDES(TextDataset):
    name = "icfg_pedes"
    aliases = ("icfg_pedes", "ICFG-PEDES")
    required = ("ICFG-PEDES.json", "imgs")
    annotations = "ICFG-PEDES.json"


class RSTPReid(TextDataset):
    name = "rstpreid"
    aliases = ("rstpreid", "RSTPReid")
    required = ("data_captions.json", "imgs")
    annotations = "data_captions.json"
    path_key = "img_path"
