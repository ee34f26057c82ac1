"""SYSU-MM01 (RGB-infrared): ``cam1..cam6/PPPP/NNNN.jpg`` and ``exp/{train,val,test}_id.txt``.

Cameras 1, 2, 4, 5 are RGB and 3, 6 infrared. Train uses the train and val ids. Test follows the
all-search mode: query = infrared test images, gallery = RGB test images (all of them; sampling
single/multi-shot galleries is the evaluator's job).
"""

from __future__ import annotations

from pathlib import Path

from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset, ImageRecord

RGB_CAMS = (1, 2, 4, 5)
IR_CAMS = (3, 6)


class SYSUMM01(ImageDataset):
    name = "sysu_mm01"
    aliases = ("sysu_mm01", "SYSU-MM01")
    required = ("exp/train_id.txt", "exp/test_id.txt")

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        d = self.dataset_dir
        cams = [c for c in (*RGB_CAMS, *IR_CAMS) if (d / f"cam{c}").is_dir()]
        if not cams:
            raise DatasetLayoutError(f"{self.name}: missing camera folders {d / 'cam1'} .. cam6")
        train_ids = self._ids("train_id.txt") + self._ids("val_id.txt", optional=True)
        test_ids = self._ids("test_id.txt")
        train = self._collect(train_ids, cams)
        test = self._collect(test_ids, cams)
        query = [r for r in test if r.modality == "infrared"]
        gallery = [r for r in test if r.modality == "rgb"]
        return train, query, gallery

    def _ids(self, name: str, optional: bool = False) -> list[int]:
        path = self.dataset_dir / "exp" / name
        if optional and not path.exists():
            return []
        text = self.require(path).read_text().strip()
        try:
            return sorted(int(tok) for tok in text.replace("\n", ",").split(",") if tok.strip())
        except ValueError as exc:
            raise DatasetLayoutError(f"{self.name}: malformed id list {path}") from exc

    def _collect(self, ids: list[int], cams: list[int]) -> list[ImageRecord]:
        records = []
        for pid in ids:
            for cam in cams:
                folder: Path = self.dataset_dir / f"cam{cam}" / f"{pid:04d}"
                if not folder.is_dir():
                    continue  # not every person is seen by every camera
                modality = "infrared" if cam in IR_CAMS else "rgb"
                records.extend(
                    ImageRecord(path=p, pid=pid, camid=cam - 1, modality=modality)
                    for p in self.images(folder)
                )
        return records
