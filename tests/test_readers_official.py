"""Readers of MSMT17, CUHK03-NP, PRCC, RegDB, ICFG-PEDES and RSTPReid on tiny fixtures written
in each official layout, and the missing file named when a layout is broken."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from chatreid.data.datasets import (
    CUHK03,
    ICFGPEDES,
    MSMT17,
    PRCC,
    DatasetLayoutError,
    RegDB,
    RSTPReid,
)


def img(path: Path, fmt: str = "JPEG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 64), (120, 30, 30)).save(path, fmt)
    return path.name


def msmt17(root: Path) -> Path:
    d = root / "MSMT17_V1"
    lists = {"train": [("train", 0, 1), ("train", 1, 3)], "val": [("train", 2, 5)],
             "query": [("test", 0, 2)], "gallery": [("test", 0, 4), ("test", 1, 15)]}
    for name, rows in lists.items():
        lines = []
        for i, (folder, pid, cam) in enumerate(rows):
            rel = f"{pid:04d}/{pid:04d}_{i:03d}_{cam:02d}_0303morning_0015_0.jpg"
            img(d / folder / rel)
            lines.append(f"{rel} {pid}")
        (d / f"list_{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_msmt17(tmp_path: Path) -> None:
    ds = MSMT17(msmt17(tmp_path))
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (1, 2), (2, 4)]  # train + val
    assert [(r.pid, r.camid) for r in ds.query] == [(0, 1)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 3), (1, 14)]
    (tmp_path / "MSMT17_V1" / "list_gallery.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"list_gallery\.txt"):
        MSMT17(tmp_path)


def test_msmt17_bad_line_and_missing_image(tmp_path: Path) -> None:
    msmt17(tmp_path)
    listing = tmp_path / "MSMT17_V1" / "list_query.txt"
    listing.write_text("0000/missing_000_02_x_0_0.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match="missing_000_02"):
        MSMT17(tmp_path)
    listing.write_text("just-one-field\n")
    with pytest.raises(DatasetLayoutError, match="bad line 1"):
        MSMT17(tmp_path)


def test_cuhk03_np_labeled_and_detected(tmp_path: Path) -> None:
    for variant, n in (("labeled", 2), ("detected", 3)):
        base = tmp_path / "cuhk03-np" / variant
        for i in range(n):
            img(base / "bounding_box_train" / f"{i + 1:04d}_c1_{i:06d}.png", "PNG")
        img(base / "query" / "0100_c1_000001.png", "PNG")
        img(base / "bounding_box_test" / "0100_c2_000002.png", "PNG")
    labeled, detected = CUHK03(tmp_path), CUHK03(tmp_path, variant="detected")
    assert len(labeled.train) == 2 and len(detected.train) == 3
    assert (labeled.query[0].pid, labeled.query[0].camid) == (100, 0)
    assert labeled.gallery[0].camid == 1
    with pytest.raises(ValueError, match="variant"):
        CUHK03(tmp_path, variant="both")  # type: ignore[arg-type]
    (tmp_path / "cuhk03-np" / "detected" / "query" / "0100_c1_000001.png").unlink()
    (tmp_path / "cuhk03-np" / "detected" / "query").rmdir()
    with pytest.raises(DatasetLayoutError, match="query"):
        CUHK03(tmp_path, variant="detected")


def prcc(root: Path) -> Path:
    rgb = root / "prcc" / "rgb"
    for pid in (1, 2):
        for cam in "ABC":
            img(rgb / "train" / f"{pid:03d}" / f"{cam}_cropped_rgb{pid:03d}.jpg")
    for pid in (7, 8):
        for cam in "ABC":
            img(rgb / "test" / cam / f"{pid:03d}" / f"cropped_rgb{pid:03d}.jpg")
    return root


def test_prcc_settings_and_clothes(tmp_path: Path) -> None:
    ds = PRCC(prcc(tmp_path))
    assert len(ds.train) == 6 and {r.camid for r in ds.train} == {0, 1, 2}
    assert {r.camid for r in ds.gallery} == {0} and {r.camid for r in ds.query} == {2}
    g7 = next(r for r in ds.gallery if r.pid == 7)
    same7 = next(r for r in ds.query_same if r.pid == 7)
    changed7 = next(r for r in ds.query_changed if r.pid == 7)
    assert g7.clothes_id == same7.clothes_id != changed7.clothes_id
    assert PRCC(tmp_path, setting="same").query == ds.query_same
    (tmp_path / "prcc" / "rgb" / "test" / "C" / "008" / "cropped_rgb008.jpg").unlink()
    for f in (tmp_path / "prcc" / "rgb" / "test" / "C").rglob("*.jpg"):
        f.unlink()
    for d in sorted((tmp_path / "prcc" / "rgb" / "test" / "C").glob("*"), reverse=True):
        d.rmdir()
    (tmp_path / "prcc" / "rgb" / "test" / "C").rmdir()
    with pytest.raises(DatasetLayoutError, match="test/C"):
        PRCC(tmp_path)


def regdb(root: Path) -> Path:
    d = root / "RegDB"
    for split, pids in (("train", (0, 1)), ("test", (5, 6))):
        for spectrum, folder, tag in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
            lines = []
            for pid in pids:
                rel = f"{folder}/{pid + 1}/male_back_{tag}_{pid:05d}_1.bmp"
                img(d / rel, "BMP")
                lines.append(f"{rel} {pid}")
            (d / "idx").mkdir(parents=True, exist_ok=True)
            (d / "idx" / f"{split}_{spectrum}_3.txt").write_text("\n".join(lines) + "\n")
    return root


def test_regdb_trials_and_directions(tmp_path: Path) -> None:
    ds = RegDB(regdb(tmp_path), trial=3)
    assert len(ds.train) == 4
    assert {r.modality for r in ds.query} == {"rgb"} and {r.camid for r in ds.gallery} == {1}
    back = RegDB(tmp_path, trial=3, direction="thermal2visible")
    assert {r.modality for r in back.query} == {"infrared"}
    assert [r.pid for r in back.gallery] == [5, 6]
    with pytest.raises(DatasetLayoutError, match=r"train_visible_1\.txt"):
        RegDB(tmp_path, trial=1)
    with pytest.raises(ValueError, match="trial"):
        RegDB(tmp_path, trial=11)


@pytest.mark.parametrize("reader,folder,annotations,key", [
    (ICFGPEDES, "ICFG-PEDES", "ICFG-PEDES.json", "file_path"),
    (RSTPReid, "RSTPReid", "data_captions.json", "img_path"),
])
def test_text_datasets(tmp_path: Path, reader, folder, annotations, key) -> None:
    d = tmp_path / folder
    items = []
    for i, split in enumerate(("train", "train", "val", "test", "test")):
        rel = f"{split}/{i:04d}/{i:04d}_00.jpg"
        img(d / "imgs" / rel)
        items.append({"id": i // 2, key: rel, "captions": [f"a person number {i}"],
                      "split": split})
    (d / annotations).write_text(json.dumps(items))
    ds = reader(tmp_path)
    assert len(ds.train) == 2 and len(ds.val) == 1 and len(ds.query) == 2
    assert ds.query[0].captions == ("a person number 3",) and ds.gallery[0].captions == ()
    (d / "imgs" / items[-1][key]).unlink()
    with pytest.raises(DatasetLayoutError, match=r"0004_00\.jpg"):
        reader(tmp_path)
    (d / annotations).unlink()
    with pytest.raises(DatasetLayoutError, match=re.escape(annotations)):
        reader(tmp_path)
