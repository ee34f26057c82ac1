"""The synthetic world: layouts on disk, annotations, determinism, live mode."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from chatreid.synth import SynthConfig, WorldManifest, generate_world, iter_live_crops
from chatreid.synth.world import build_site, make_captions, sample_sightings

TINY = SynthConfig.tiny()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldManifest:
    return generate_world(tmp_path_factory.mktemp("world"), TINY, progress=False)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_config_is_small_and_default_is_a_small_site() -> None:
    site = build_site(TINY)
    assert len(sample_sightings(site)) <= 300
    default = SynthConfig()
    assert default.n_identities >= 50 and len(default.ir_cameras) == 2
    assert default.n_cameras == 6


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError):
        SynthConfig(n_cameras=3, ir_cameras=(5,))
    with pytest.raises(ValidationError):
        SynthConfig(n_cameras=3, ir_cameras=(0, 1))  # a single RGB camera cannot re-identify
    with pytest.raises(ValidationError):
        SynthConfig(images_per_camera=(4, 2))
    with pytest.raises(ValidationError):
        SynthConfig(crop_size=(512, 256))  # larger than the camera frame


def test_manifest_written_and_counts_add_up(world: WorldManifest) -> None:
    on_disk = json.loads((world.root / "manifest.json").read_text())
    assert "root" not in on_disk and on_disk["seed"] == TINY.seed
    assert world.n_images == world.n_rgb_images + world.n_ir_images
    market = world.layouts["market1501"].counts
    files = {
        d: len(list((world.layout_path("market1501") / d).iterdir()))
        for d in ("bounding_box_train", "query", "bounding_box_test")
    }
    assert files["bounding_box_train"] == market["train"]
    assert files["query"] == market["query"]
    assert files["bounding_box_test"] == market["gallery"] + market["junk"]
    assert market["train"] + market["query"] + market["gallery"] == world.n_rgb_images
    sysu = world.layouts["sysu_mm01"].counts
    assert sysu["rgb"] + sysu["ir"] == world.n_images
    assert len(list(world.layout_path("sysu_mm01").rglob("*.jpg"))) == world.n_images


def test_market_images_are_base_size_rgb_and_others_vary(world: WorldManifest) -> None:
    h, w = TINY.crop_size
    for p in sorted((world.layout_path("market1501") / "query").iterdir())[:5]:
        with Image.open(p) as im:
            assert (im.mode, im.size) == ("RGB", (w, h))
    sizes = set()
    for p in sorted((world.layout_path("ltcc") / "train").iterdir()):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            sizes.add(im.size)
            assert h <= im.size[1] <= 2 * h and 0.35 < im.size[0] / im.size[1] < 0.7
    assert len(sizes) > 3  # scale jitter


def test_infrared_images_are_single_channel_and_thermal(world: WorldManifest) -> None:
    root = world.layout_path("sysu_mm01")
    ir = sorted((root / "cam3").rglob("*.jpg")) + sorted((root / "cam6").rglob("*.jpg"))
    rgb = sorted((root / "cam1").rglob("*.jpg"))
    assert ir and rgb
    for p in ir:
        with Image.open(p) as im:
            assert im.mode == "L"
            a = np.asarray(im, dtype=np.float32)
        # bodies are bright on a dark background: centre column brighter than the borders
        w = a.shape[1]
        assert a[:, w // 3 : 2 * w // 3].max() > 150
        assert np.median(a[:, : w // 8]) < 110
    with Image.open(rgb[0]) as im:
        assert im.mode == "RGB"


def test_crops_contain_a_person_not_noise(world: WorldManifest) -> None:
    """Person pixels differ from the background; neighbouring pixels are correlated."""
    for p in sorted((world.layout_path("ltcc") / "train").iterdir())[:10]:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L"), dtype=np.float32)
        smooth = np.abs(np.diff(a, axis=1)).mean()
        assert smooth < 12, "crop looks like noise"
        assert a.std() > 15, "crop is flat"


def test_attributes_cover_images_and_follow_the_viewpoint(world: WorldManifest) -> None:
    ann = json.loads((world.root / world.attributes_path).read_text())
    for layout in ("market1501", "ltcc", "sysu_mm01", "cuhk_pedes"):
        for p in world.layout_path(layout).rglob("*"):
            if p.suffix in (".jpg", ".png"):
                assert str(p.relative_to(world.root)) in ann
    keys = {
        "gender",
        "age",
        "hair_style",
        "hair_colour",
        "upper_type",
        "upper_colour",
        "lower_type",
        "lower_colour",
        "shoes_colour",
        "accessories",
        "posture",
        "viewpoint",
        "occluded",
    }
    real = [e for e in ann.values() if not e["junk"]]
    assert all(keys <= e["attributes"].keys() for e in real)
    for e in real:
        a = e["attributes"]
        if a["viewpoint"] == "back":
            assert "glasses" not in a["accessories"] and a["upper_pattern"] != "logo"
        assert a["occluded"] == (a["occluder"] is not None)
    assert {e["attributes"]["viewpoint"] for e in real} == {"front", "back", "side"}
    assert any(e["attributes"]["occluded"] for e in real)
    rgb = [e for e in real if e["modality"] == "rgb"]
    assert all(len(e["captions"]) == TINY.captions_per_image for e in rgb)


def test_identities_and_distractors_share_outfit_or_traits(world: WorldManifest) -> None:
    ids = json.loads((world.root / world.identities_path).read_text())
    assert len(ids) == TINY.n_identities + TINY.n_distractors
    by_pid = {p["pid"]: p for p in ids}
    distractors = [p for p in ids if p["is_distractor"]]
    assert len(distractors) == TINY.n_distractors
    clothes = [o["clothes_id"] for p in ids for o in p["outfits"]]
    assert len(clothes) == len(set(clothes)), "clothes ids are unique per outfit"

    def look(o: dict) -> dict:
        return {k: v for k, v in o.items() if k != "clothes_id"}

    for d in distractors:
        target = by_pid[d["distractor_of"]]
        assert d["split"] == "test" and not target["is_distractor"]
        same_traits = d["traits"] == target["traits"]
        same_outfit = any(look(a) == look(b) for a in d["outfits"] for b in target["outfits"])
        assert same_traits or same_outfit
        assert ("traits" in d["shares"]) == same_traits
        assert ("outfit" in d["shares"]) == same_outfit


def test_same_seed_reproduces_every_byte_and_other_seed_differs(tmp_path: Path) -> None:
    cfg = SynthConfig.tiny(n_identities=4, n_distractors=1, junk_images=1)
    generate_world(tmp_path / "a", cfg, progress=False)
    generate_world(tmp_path / "b", cfg, progress=False)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and len(a) > 20
    generate_world(tmp_path / "a", cfg, progress=False)  # regenerating in place: same tree
    assert tree_digest(tmp_path / "a") == a
    generate_world(tmp_path / "c", cfg.model_copy(update={"seed": 1}), progress=False)
    c = tree_digest(tmp_path / "c")
    assert c["attributes/identities.json"] != a["attributes/identities.json"]
    images = {v for k, v in a.items() if k.endswith((".jpg", ".png"))}
    assert not images & set(c.values())


def test_captions_vary_and_are_deterministic() -> None:
    attrs = {
        "gender": "female",
        "age": "young",
        "build": "slim",
        "height": "tall",
        "hair_style": "ponytail",
        "hair_colour": "brown",
        "upper_type": "jacket",
        "upper_colour": "red",
        "upper_pattern": "striped",
        "upper_secondary_colour": "white",
        "lower_type": "skirt",
        "lower_colour": "black",
        "shoes_colour": "white",
        "accessory_colours": {"backpack": "blue", "glasses": "black"},
        "posture": "upright",
        "viewpoint": "front",
        "occluder": None,
    }
    runs = [make_captions(attrs, np.random.default_rng(s), 2) for s in range(12)]
    assert runs[0] == make_captions(attrs, np.random.default_rng(0), 2)
    flat = [c for pair in runs for c in pair]
    assert len(set(flat)) >= 10
    assert all(pair[0] != pair[1] for pair in runs)
    assert all("red" in c and "ponytail" in c and "backpack" in c for c in flat)
    assert len({c.split()[0] for c in flat}) >= 3  # different sentence openings


def test_live_mode_stream(tmp_path: Path) -> None:
    crops = list(iter_live_crops(TINY, start_time=1_700_000_000.0, limit=40))
    assert len(crops) == 40
    times = [c.capture_time for c in crops]
    assert times == sorted(times) and times[0] >= 1_700_000_000.0
    assert len(set(times)) > 30
    tracks = Counter(c.track_id for c in crops)
    assert max(tracks.values()) <= 4 and len(tracks) > 5
    site = build_site(TINY)
    for c in crops:
        with Image.open(io.BytesIO(c.jpeg)) as im:
            assert im.format == "JPEG"
            assert im.mode == ("L" if c.modality == "infrared" else "RGB")
            assert im.size == c.bbox[2:]
        x, y, w, h = c.bbox
        assert x >= 0 and y >= 0 and x + w <= 1280 and y + h <= 720
        assert c.camera in {f"c{i + 1}" for i in range(TINY.n_cameras)}
        assert c.clothes_id in {o.clothes_id for o in site.identity(c.person_id).outfits}
        assert c.attributes["viewpoint"] in ("front", "back", "side")
    # a track is one person in one camera, in one outfit
    for tid in tracks:
        members = [c for c in crops if c.track_id == tid]
        assert len({(c.person_id, c.camera, c.clothes_id) for c in members}) == 1
    again = list(iter_live_crops(TINY, start_time=1_700_000_000.0, limit=40))
    assert [c.jpeg for c in again] == [c.jpeg for c in crops]
    assert [c.track_id for c in again] == [c.track_id for c in crops]


def test_live_mode_paces_when_asked() -> None:
    t0 = time.monotonic()
    crops = list(iter_live_crops(TINY, rate_hz=40.0, limit=4))
    assert len(crops) == 4 and time.monotonic() - t0 >= 3 / 40
