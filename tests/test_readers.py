"""Dataset readers on the generated layouts, on hand-made real-style names and on broken trees."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from chatreid.data import (
    CUHKPEDES,
    LTCC,
    SYSUMM01,
    DatasetLayoutError,
    ImageRecord,
    Market1501,
)
from chatreid.synth import SynthConfig, WorldManifest, generate_world

TINY = SynthConfig.tiny(seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldManifest:
    return generate_world(tmp_path_factory.mktemp("world"), TINY, progress=False)


@pytest.fixture(scope="module")
def annotations(world: WorldManifest) -> dict[str, dict]:
    return json.loads((world.root / world.attributes_path).read_text())


@pytest.fixture(scope="module")
def identities(world: WorldManifest) -> dict[int, dict]:
    return {p["pid"]: p for p in json.loads((world.root / world.identities_path).read_text())}


def truth(world: WorldManifest, ann: dict[str, dict], r: ImageRecord) -> dict:
    return ann[str(r.path.relative_to(world.root))]


def test_market1501(world: WorldManifest, annotations: dict, identities: dict) -> None:
    ds = Market1501(world.root)  # finds the market1501/ sub-folder
    c = world.layouts["market1501"].counts
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (c["train"], c["query"], c["gallery"])
    assert all(r.pid > 0 for r in ds.train + ds.query)
    assert not {r.pid for r in ds.train} & {r.pid for r in ds.query + ds.gallery}
    assert {r.pid for r in ds.query} <= {r.pid for r in ds.gallery}
    assert sum(r.pid == 0 for r in ds.gallery) == c["distractors"] > 0
    assert all(r.pid != -1 for r in ds.gallery)  # junk skipped
    assert ds.num_train_pids == c["train_ids"]
    for r in ds.train + ds.query + ds.gallery:
        t = truth(world, annotations, r)
        assert (r.camid, r.modality, r.clothes_id) == (t["camid"], "rgb", None)
        assert r.pid == (0 if identities[t["person_id"]]["is_distractor"] else t["person_id"])
    # every query has a same-identity gallery image from another camera
    cams = defaultdict(set)
    for r in ds.gallery:
        cams[r.pid].add(r.camid)
    assert all(cams[q.pid] - {q.camid} for q in ds.query)


def test_ltcc_cloth_changing(world: WorldManifest, annotations: dict, identities: dict) -> None:
    ds = LTCC(world.layout_path("ltcc"))
    c = world.layouts["ltcc"].counts
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (c["train"], c["query"], c["gallery"])
    for r in ds.train + ds.query + ds.gallery:
        t = truth(world, annotations, r)
        assert (r.pid, r.camid, r.clothes_id) == (t["person_id"], t["camid"], t["clothes_id"])
        assert r.clothes_id in {o["clothes_id"] for o in identities[r.pid]["outfits"]}
        assert r.path.suffix == ".png"
    clothes = defaultdict(set)
    for r in ds.query + ds.gallery:
        clothes[r.pid].add(r.clothes_id)
    assert any(len(v) >= 2 for v in clothes.values()), "someone must change clothes in test"
    # one query per test identity and outfit
    assert len({(r.pid, r.clothes_id) for r in ds.query}) == len(ds.query)


def test_sysu_mm01_cross_modality(world: WorldManifest, annotations: dict) -> None:
    ds = SYSUMM01(world.root)
    c = world.layouts["sysu_mm01"].counts
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (c["train"], c["query"], c["gallery"])
    assert {r.modality for r in ds.query} == {"infrared"}
    assert {r.camid + 1 for r in ds.query} <= {3, 6}
    assert {r.modality for r in ds.gallery} == {"rgb"}
    assert {r.camid + 1 for r in ds.gallery} <= {1, 2, 4, 5}
    test_ids = {int(x) for x in (ds.dataset_dir / "exp/test_id.txt").read_text().split(",")}
    assert {r.pid for r in ds.query + ds.gallery} <= test_ids
    assert not {r.pid for r in ds.train} & test_ids
    for r in ds.query[:20]:
        assert truth(world, annotations, r)["person_id"] == r.pid
        with Image.open(r.path) as im:
            assert im.mode == "L"


def test_cuhk_pedes_text(world: WorldManifest, annotations: dict) -> None:
    ds = CUHKPEDES(world.root)
    c = world.layouts["cuhk_pedes"].counts
    assert (len(ds.train), len(ds.val), len(ds.query)) == (c["train"], c["val"], c["test"])
    assert len(ds.gallery) == len(ds.query)
    assert all(len(r.captions) == 2 for r in ds.train + ds.query)
    assert all(r.captions == () for r in ds.gallery)
    raw = json.loads((ds.dataset_dir / "reid_raw.json").read_text())
    assert {"split", "captions", "file_path", "processed_tokens", "id"} <= raw[0].keys()
    assert raw[0]["processed_tokens"][0][0] == raw[0]["captions"][0].split()[0].lower()
    for r in ds.query[:10]:
        t = truth(world, annotations, r)
        assert t["person_id"] == r.pid and list(r.captions) == t["captions"]


def test_real_style_market_names(tmp_path: Path) -> None:
    """Names exactly as in the released Market-1501, including junk and distractors."""
    for folder, names in {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg"],
        "bounding_box_test": [
            "-1_c1s1_000401_03.jpg",
            "0000_c1s1_000151_01.jpg",
            "0001_c1s1_001051_03.jpg",
        ],
        "query": ["0001_c5s1_001426_00.jpg"],
    }.items():
        (tmp_path / folder).mkdir()
        for n in names:
            (tmp_path / folder / n).write_bytes(b"")
    (tmp_path / "bounding_box_train" / "Thumbs.db").write_bytes(b"")  # ignored: not an image
    ds = Market1501(tmp_path)
    assert [(r.pid, r.camid) for r in ds.train] == [(2, 0), (2, 1)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 0), (1, 0)]
    assert [(r.pid, r.camid) for r in ds.query] == [(1, 4)]


@pytest.mark.parametrize(
    ("reader", "layout", "remove", "expect"),
    [
        (Market1501, "market1501", "query", "query"),
        (LTCC, "ltcc", "test", "test"),
        (SYSUMM01, "sysu_mm01", "exp/test_id.txt", "test_id.txt"),
        (CUHKPEDES, "cuhk_pedes", "reid_raw.json", "reid_raw.json"),
    ],
)
def test_broken_layout_names_the_missing_path(
    world: WorldManifest, tmp_path: Path, reader: type, layout: str, remove: str, expect: str
) -> None:
    root = tmp_path / layout
    shutil.copytree(world.layout_path(layout), root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetLayoutError, match=expect) as exc:
        reader(root)
    assert str(target) in str(exc.value)


def test_missing_pedes_image_and_empty_root(world: WorldManifest, tmp_path: Path) -> None:
    root = tmp_path / "cuhk_pedes"
    shutil.copytree(world.layout_path("cuhk_pedes"), root)
    first = json.loads((root / "reid_raw.json").read_text())[0]["file_path"]
    (root / "imgs" / first).unlink()
    with pytest.raises(DatasetLayoutError, match=Path(first).name):
        CUHKPEDES(root)
    with pytest.raises(DatasetLayoutError, match="missing dataset folder"):
        Market1501(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="bounding_box_train"):
        Market1501(tmp_path / "empty")
