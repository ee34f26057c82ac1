"""Writers for the benchmark layouts, and ``generate_world`` which renders a site into them.

Every layout is filled from the same rendered crops:

- ``market1501/``: RGB cameras; train ids in ``bounding_box_train``; test ids split into ``query``
  (one image per identity and camera) and ``bounding_box_test``; distractors are written as pid
  ``0000`` and bad detections as pid ``-1`` in ``bounding_box_test``, as in Market-1501. Images are
  resized to ``config.crop_size`` like the real 128x64 crops.
- ``ltcc/``: RGB cameras, native crop size, PNG like the real LTCC; names ``PID_CLOTHES_cCAM_FRAME``
  where CLOTHES is the *global* clothes id (unique per person and outfit, so it is usable as a
  clothes label directly). ``query`` holds one image per test identity and outfit; distractors are
  gallery-only (``test``) with their own pids.
- ``sysu_mm01/``: all cameras, RGB ones mapped round-robin onto SYSU's RGB cams 1,2,4,5 and
  infrared ones onto 3,6; infrared crops are single-channel JPEGs. ``exp/*_id.txt`` list the ids;
  distractors belong to the test ids.
- ``cuhk_pedes/``: RGB cameras, ``imgs/{train,test}_query/pPID_sINDEX.jpg`` plus ``reid_raw.json``.
- ``attributes/attributes.json``: per-image annotations keyed by path relative to ``out_dir``;
  ``attributes/identities.json``: each identity's traits and outfits (ground truth).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from chatreid.synth.render import Renderer, encode_jpeg, encode_png
from chatreid.synth.world import (
    TAG_SPLIT,
    Sighting,
    Site,
    SynthConfig,
    build_site,
    captions_for,
    image_attributes,
    sample_sightings,
    tokenize,
)

SYSU_RGB_CAMS = (1, 2, 4, 5)
SYSU_IR_CAMS = (3, 6)
OWNED = ("market1501", "ltcc", "sysu_mm01", "cuhk_pedes", "attributes", "manifest.json")


class LayoutInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the world root
    counts: dict[str, int]


class WorldManifest(BaseModel):
    """What ``generate_world`` wrote. ``root`` is left out of ``manifest.json`` (portable)."""

    root: Path
    site: str
    seed: int
    config: SynthConfig
    n_identities: int
    n_distractors: int
    n_clothes: int
    n_images: int  # rendered crops, excluding junk
    n_rgb_images: int
    n_ir_images: int
    n_junk_images: int
    layouts: dict[str, LayoutInfo]
    attributes_path: str
    identities_path: str

    def layout_path(self, name: str) -> Path:
        return self.root / self.layouts[name].path


@dataclasses.dataclass(frozen=True)
class Placement:
    relpath: str  # relative to the world root
    fmt: str  # "jpeg", "png" or "jpeg-base" (resized to the base crop size)
    label_pid: int  # pid as written in the layout (Market: 0 distractor, -1 junk)
    split: str


Plan = dict[int, list[Placement]]


def _rng(site: Site, layout: int) -> np.random.Generator:
    return np.random.default_rng([site.config.seed, TAG_SPLIT, layout])


def _pick_queries(
    groups: dict[tuple[int, int], list[Sighting]], rng: np.random.Generator
) -> set[int]:
    """One query per group with >=2 images; a person with no such group gets one if it has >=2."""
    queries: set[int] = set()
    by_pid: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for key in sorted(groups):
        by_pid[key[0]].append(key)
    for keys in by_pid.values():
        chosen = [k for k in keys if len(groups[k]) >= 2]
        if not chosen and sum(len(groups[k]) for k in keys) >= 2:
            chosen = keys[:1]
        for k in chosen:
            members = groups[k]
            queries.add(members[int(rng.integers(len(members)))].index)
    return queries


def _plan_market(site: Site, sightings: list[Sighting], plan: Plan) -> dict[str, int]:
    rgb = [s for s in sightings if site.cameras[s.camera].modality == "rgb"]
    groups: dict[tuple[int, int], list[Sighting]] = defaultdict(list)
    for s in rgb:
        if (
            not s.junk
            and site.identity(s.pid).split == "test"
            and not site.identity(s.pid).is_distractor
        ):
            groups[(s.pid, s.camera)].append(s)
    queries = _pick_queries(groups, _rng(site, 1))
    det_index: dict[tuple[int, int, int], int] = defaultdict(int)
    counts: dict[str, int] = dict.fromkeys(("train", "query", "gallery", "distractors", "junk"), 0)
    for s in rgb:
        ident = site.identity(s.pid)
        if s.junk:
            folder, pid, key = "bounding_box_test", -1, "junk"
        elif ident.split in ("train", "val"):
            folder, pid, key = "bounding_box_train", s.pid, "train"
        elif ident.is_distractor:
            folder, pid, key = "bounding_box_test", 0, "distractors"
        elif s.index in queries:
            folder, pid, key = "query", s.pid, "query"
        else:
            folder, pid, key = "bounding_box_test", s.pid, "gallery"
        det_index[(s.camera, s.day, s.frame)] += 1
        nn = det_index[(s.camera, s.day, s.frame)]
        pid_str = "-1" if pid < 0 else f"{pid:04d}"
        name = f"{pid_str}_c{s.camera + 1}s{s.day + 1}_{s.frame:06d}_{nn:02d}.jpg"
        plan[s.index].append(Placement(f"market1501/{folder}/{name}", "jpeg-base", pid, key))
        counts[key] += 1
    counts["gallery"] += counts["distractors"]  # distractors are gallery images (pid 0)
    counts["train_ids"] = len(site.ids("train", "val"))
    counts["query_ids"] = len({s.pid for s in rgb if s.index in queries})
    return counts


def _plan_ltcc(site: Site, sightings: list[Sighting], plan: Plan) -> dict[str, int]:
    rgb = [s for s in sightings if not s.junk and site.cameras[s.camera].modality == "rgb"]
    groups: dict[tuple[int, int], list[Sighting]] = defaultdict(list)
    for s in rgb:
        if site.identity(s.pid).split == "test" and not site.identity(s.pid).is_distractor:
            groups[(s.pid, s.clothes_id)].append(s)
    queries = _pick_queries(groups, _rng(site, 2))
    used: set[str] = set()
    counts: dict[str, int] = dict.fromkeys(("train", "query", "gallery"), 0)
    for s in rgb:
        split = site.identity(s.pid).split
        folder, key = (
            ("train", "train")
            if split in ("train", "val")
            else (("query", "query") if s.index in queries else ("test", "gallery"))
        )
        frame = s.frame
        while (name := f"{s.pid:03d}_{s.clothes_id}_c{s.camera + 1}_{frame:06d}.png") in used:
            frame += 1  # same person, camera and frame on another day
        used.add(name)
        plan[s.index].append(Placement(f"ltcc/{folder}/{name}", "png", s.pid, key))
        counts[key] += 1
    counts["train_ids"] = len(site.ids("train", "val"))
    counts["test_ids"] = len(site.ids("test"))
    counts["clothes"] = len({s.clothes_id for s in rgb})
    return counts


def sysu_camera_map(site: Site) -> dict[int, int]:
    """Synthetic camera index -> SYSU camera number (1..6)."""
    cfg = site.config
    mapping = {c: SYSU_RGB_CAMS[i % 4] for i, c in enumerate(cfg.rgb_cameras)}
    mapping.update({c: SYSU_IR_CAMS[i % 2] for i, c in enumerate(cfg.ir_cameras)})
    return mapping


def _plan_sysu(site: Site, sightings: list[Sighting], plan: Plan) -> dict[str, int]:
    cams = sysu_camera_map(site)
    serial: dict[tuple[int, int], int] = defaultdict(int)
    counts: dict[str, int] = dict.fromkeys(("train", "query", "gallery", "rgb", "ir"), 0)
    for s in sightings:
        if s.junk:
            continue
        cam = cams[s.camera]
        serial[(cam, s.pid)] += 1
        infrared = cam in SYSU_IR_CAMS
        test = site.identity(s.pid).split == "test"
        key = ("query" if infrared else "gallery") if test else "train"
        rel = f"sysu_mm01/cam{cam}/{s.pid:04d}/{serial[(cam, s.pid)]:04d}.jpg"
        plan[s.index].append(Placement(rel, "jpeg", s.pid, key))
        counts[key] += 1
        counts["ir" if infrared else "rgb"] += 1
    for split in ("train", "val", "test"):
        counts[f"{split}_ids"] = len(site.ids(split))
    return counts


def _plan_pedes(site: Site, sightings: list[Sighting], plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys(("train", "val", "test"), 0)
    for s in sightings:
        if s.junk or site.cameras[s.camera].modality != "rgb":
            continue
        split = site.identity(s.pid).split
        folder = "test_query" if split == "test" else "train_query"
        rel = f"cuhk_pedes/imgs/{folder}/p{s.pid}_s{s.index}.jpg"
        plan[s.index].append(Placement(rel, "jpeg", s.pid, split))
        counts[split] += 1
    counts["captions"] = site.config.captions_per_image * sum(counts.values())
    return counts


PLANNERS: dict[str, Callable[[Site, list[Sighting], Plan], dict[str, int]]] = {
    "market1501": _plan_market,
    "ltcc": _plan_ltcc,
    "sysu_mm01": _plan_sysu,
    "cuhk_pedes": _plan_pedes,
}


def _dump(path: Path, obj: object, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if indent is None else (",", ": ")
    path.write_text(json.dumps(obj, indent=indent, sort_keys=True, separators=separators) + "\n")


def _clear(out_dir: Path) -> None:
    """Remove what a previous run wrote (only our own names) so no stale file survives."""
    for name in OWNED:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _write_image(
    out_dir: Path, pl: Placement, img: Image.Image, cache: dict[str, bytes], cfg: SynthConfig
) -> None:
    if pl.fmt not in cache:
        if pl.fmt == "png":
            cache[pl.fmt] = encode_png(img)
        elif pl.fmt == "jpeg-base":
            h, w = cfg.crop_size
            cache[pl.fmt] = encode_jpeg(
                img.resize((w, h), Image.Resampling.BILINEAR), cfg.jpeg_quality
            )
        else:
            cache[pl.fmt] = encode_jpeg(img, cfg.jpeg_quality)
    path = out_dir / pl.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cache[pl.fmt])


def _annotation(site: Site, s: Sighting, pl: Placement) -> dict[str, object]:
    cam = site.cameras[s.camera]
    entry: dict[str, object] = {
        "person_id": s.pid,
        "label_pid": pl.label_pid,
        "clothes_id": s.clothes_id,
        "camera": cam.name,
        "camid": s.camera,
        "modality": cam.modality,
        "split": pl.split,
        "track_id": s.track_id,
        "capture_time": s.time_s,
        "bbox": list(s.bbox),
        "junk": s.junk,
    }
    if not s.junk:
        entry["attributes"] = image_attributes(site, s)
    return entry


def _identities_json(site: Site) -> list[dict[str, object]]:
    out = []
    for ident in site.identities:
        d = dataclasses.asdict(ident)
        d["is_distractor"] = ident.is_distractor
        d["cameras"] = [site.cameras[c].name for c in ident.cameras]
        out.append(d)
    return out


def generate_world(out_dir: Path, config: SynthConfig, progress: bool = True) -> WorldManifest:
    """Render the site of ``config`` into every layout under ``out_dir``; deterministic by seed.

    Re-running on the same ``out_dir`` replaces what an earlier run wrote there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    site = build_site(config)
    sightings = sample_sightings(site)
    plan: Plan = {s.index: [] for s in sightings}
    counts = {name: planner(site, sightings, plan) for name, planner in PLANNERS.items()}
    renderer = Renderer(site)
    annotations: dict[str, dict[str, object]] = {}
    pedes: list[dict[str, object]] = []
    for s in tqdm(sightings, desc=f"synth {config.site}", unit="img", disable=not progress):
        img = renderer.render(s)
        cache: dict[str, bytes] = {}
        captions: list[str] = []
        if not s.junk and site.cameras[s.camera].modality == "rgb":
            captions = captions_for(site, s, image_attributes(site, s))
        for pl in plan[s.index]:
            _write_image(out_dir, pl, img, cache, config)
            entry = _annotation(site, s, pl)
            if captions:
                entry["captions"] = captions
            annotations[pl.relpath] = entry
            if pl.relpath.startswith("cuhk_pedes/"):
                pedes.append(
                    {
                        "split": pl.split,
                        "captions": captions,
                        "file_path": pl.relpath.removeprefix("cuhk_pedes/imgs/"),
                        "processed_tokens": [tokenize(c) for c in captions],
                        "id": s.pid,
                    }
                )
    _write_sysu_splits(out_dir, site)
    _dump(out_dir / "cuhk_pedes" / "reid_raw.json", pedes, indent=None)
    _dump(out_dir / "attributes" / "attributes.json", annotations, indent=None)
    _dump(out_dir / "attributes" / "identities.json", _identities_json(site))
    real = [s for s in sightings if not s.junk]
    manifest = WorldManifest(
        root=out_dir,
        site=config.site,
        seed=config.seed,
        config=config,
        n_identities=config.n_identities,
        n_distractors=config.n_distractors,
        n_clothes=sum(len(p.outfits) for p in site.identities),
        n_images=len(real),
        n_rgb_images=sum(site.cameras[s.camera].modality == "rgb" for s in real),
        n_ir_images=sum(site.cameras[s.camera].modality == "infrared" for s in real),
        n_junk_images=len(sightings) - len(real),
        layouts={name: LayoutInfo(path=name, counts=c) for name, c in counts.items()},
        attributes_path="attributes/attributes.json",
        identities_path="attributes/identities.json",
    )
    _dump(out_dir / "manifest.json", manifest.model_dump(mode="json", exclude={"root"}))
    return manifest


def _write_sysu_splits(out_dir: Path, site: Site) -> None:
    exp = out_dir / "sysu_mm01" / "exp"
    exp.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        ids = ",".join(str(pid) for pid in site.ids(split))
        (exp / f"{split}_id.txt").write_text(ids + "\n")
