"""The synthetic site: identities, outfits, cameras, sightings, attributes and captions.

Everything here is metadata only (no pixels); ``render.py`` draws it and ``layouts.py`` writes it.
All randomness comes from ``numpy.random.default_rng`` seeded by ``(config.seed, TAG, ...)`` so
each stream is independent of iteration order and a seed reproduces the site exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatreid.colours import BASIC_COLOURS

Rgb = tuple[int, int, int]
Viewpoint = Literal["front", "back", "side"]

FRAME_SIZE = (1280, 720)  # (width, height) of every camera frame; bboxes live in this space
FPS = 25
DAY_START_S = 8 * 3600  # offline footage: each day's recording starts at 08:00
DAY_LENGTH_S = 39_000  # keeps Market/LTCC frame numbers within 6 digits at FPS

# Stream tags: one independent random stream per purpose.
TAG_SITE, TAG_SIGHTINGS, TAG_RENDER, TAG_SPLIT, TAG_CAPTION, TAG_LIVE, TAG_SCENE = range(1, 8)

COLOURS: dict[str, Rgb] = BASIC_COLOURS  # outfits are painted in the basic colour terms
SKIN_TONES: dict[str, Rgb] = {
    "very light": (246, 218, 196),
    "light": (232, 192, 162),
    "medium": (202, 152, 116),
    "tan": (170, 118, 84),
    "brown": (120, 80, 56),
    "dark": (82, 56, 42),
}
HAIR_COLOURS: dict[str, Rgb] = {
    "black": (26, 22, 20),
    "brown": (88, 58, 34),
    "blonde": (212, 178, 112),
    "red": (150, 62, 30),
    "grey": (165, 165, 162),
}
GENDERS = ("male", "female")
AGES = ("teen", "young", "adult", "senior")
AGE_RANGES = {"teen": "13-17", "young": "18-30", "adult": "31-55", "senior": "56+"}
BUILDS = ("slim", "average", "heavy")
POSTURES = ("upright", "slouched", "leaning")
HAIR_STYLES = ("short", "long", "ponytail", "bun", "bald")
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "hoodie", "coat")
PATTERNS = ("solid", "striped", "checked", "logo")
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt")
SHOE_COLOURS = ("black", "white", "brown", "grey", "red", "blue")
OCCLUDERS = ("pole", "car", "person", "sign")
VIEWPOINTS: tuple[Viewpoint, ...] = ("front", "back", "side")
# Distractor recipes, cycled: what a distractor copies from its target identity.
DISTRACTOR_MODES: tuple[tuple[str, ...], ...] = (
    ("outfit",),
    ("traits",),
    ("outfit",),
    ("traits",),
    ("outfit", "traits"),
)


class SynthConfig(BaseModel):
    """Knobs of the synthetic site. Defaults give the "small site" (~60 people, 6 cameras)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(default=0, ge=0)
    site: str = "synth-site"
    n_identities: int = Field(default=60, ge=2, description="regular identities (split train/test)")
    n_distractors: int = Field(
        default=12, ge=0, description="test-only look-alikes of other identities")
    n_cameras: int = Field(default=6, ge=2, le=16)
    ir_cameras: tuple[int, ...] = Field(
        default=(2, 5), description="0-based indices of infrared cameras")
    outfits_per_identity: tuple[int, int] = (1, 3)
    images_per_camera: tuple[int, int] = Field(
        default=(2, 7), description="per identity per camera")
    camera_coverage: float = Field(
        default=0.8, ge=0.0, le=1.0, description="P(identity passes a camera)")
    crop_size: tuple[int, int] = Field(default=(128, 64), description="base crop (height, width)")
    scale_jitter: tuple[float, float] = Field(
        default=(1.0, 2.0), description="crop height / base height")
    train_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    val_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="of train ids (SYSU, PEDES)")
    junk_images: int = Field(default=16, ge=0, description="Market pid -1 bad detections")
    occlusion_rate: float = Field(default=0.2, ge=0.0, le=1.0)
    jpeg_quality: int = Field(default=90, ge=30, le=100)
    captions_per_image: int = Field(default=2, ge=1, le=5)

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        for name in ("outfits_per_identity", "images_per_camera", "scale_jitter"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if len(set(self.ir_cameras)) != len(self.ir_cameras):
            raise ValueError("ir_cameras contains duplicates")
        if any(not 0 <= c < self.n_cameras for c in self.ir_cameras):
            raise ValueError(f"ir_cameras must be in [0, {self.n_cameras})")
        if self.n_cameras - len(self.ir_cameras) < 2:
            raise ValueError("need at least 2 RGB cameras for cross-camera queries")
        if min(self.crop_size) < 16:
            raise ValueError("crop_size too small")
        if self.crop_size[0] * self.scale_jitter[1] > FRAME_SIZE[1] - 20:
            raise ValueError(f"largest crop must fit the {FRAME_SIZE[1]} px camera frame")
        return self

    @classmethod
    def tiny(cls, seed: int = 0, **overrides: object) -> SynthConfig:
        """A few hundred images at most: for tests."""
        base: dict[str, object] = {
            "seed": seed,
            "n_identities": 8,
            "n_distractors": 2,
            "n_cameras": 5,
            "ir_cameras": (2, 4),
            "outfits_per_identity": (1, 2),
            "images_per_camera": (1, 3),
            "camera_coverage": 0.7,
            "junk_images": 3,
        }
        base.update(overrides)
        return cls.model_validate(base)  # validated like cls(**base), typed for the checker

    @property
    def rgb_cameras(self) -> tuple[int, ...]:
        return tuple(c for c in range(self.n_cameras) if c not in self.ir_cameras)


@dataclass(frozen=True)
class BodyTraits:
    """Persistent across outfits and days."""

    gender: str
    age: str
    build: str
    height_cm: int
    skin_tone: str
    skin_rgb: Rgb
    hair_style: str
    hair_colour: str
    hair_rgb: Rgb
    posture: str
    glasses: bool


@dataclass(frozen=True)
class Outfit:
    clothes_id: int  # globally unique; a copied outfit gets a new id
    upper_type: str
    upper_colour: str
    upper_rgb: Rgb
    upper_pattern: str
    secondary_colour: str  # stripes/checks/logo/jacket inner
    secondary_rgb: Rgb
    lower_type: str
    lower_colour: str
    lower_rgb: Rgb
    shoes_colour: str
    shoes_rgb: Rgb
    hat_colour: str | None
    bag_colour: str | None
    backpack_colour: str | None

    @property
    def look(self) -> tuple[object, ...]:
        """Everything visible, without the clothes id (to compare copied outfits)."""
        d = self.__dict__
        return tuple(v for k, v in d.items() if k != "clothes_id")


@dataclass(frozen=True)
class Identity:
    pid: int  # 1-based
    split: Literal["train", "val", "test"]
    traits: BodyTraits
    outfits: tuple[Outfit, ...]
    cameras: tuple[int, ...]  # 0-based camera indices this person passes
    distractor_of: int | None = None
    shares: tuple[str, ...] = ()

    @property
    def is_distractor(self) -> bool:
        return self.distractor_of is not None


@dataclass(frozen=True)
class Camera:
    index: int  # 0-based; name is c{index+1}
    modality: Literal["rgb", "infrared"]
    view_probs: tuple[float, float, float]  # front, back, side
    person_px: float  # bbox height of a 175 cm person
    horizon: int  # y of the horizon in the frame
    indoor: bool
    resolution: float  # <1: detail lost (down/up-sampled)
    gain: float
    gamma: float
    tint: tuple[float, float, float]
    blur: float
    occlusion: float
    clutter: int

    @property
    def name(self) -> str:
        return f"c{self.index + 1}"


@dataclass(frozen=True)
class Sighting:
    """One crop: who, in which clothes, where, when and how it is seen."""

    index: int
    pid: int
    clothes_id: int
    camera: int
    day: int
    time_s: float  # seconds since the site's epoch
    frame: int
    track_id: str
    track_pos: int
    viewpoint: Viewpoint
    facing: int  # +1 right, -1 left (side views)
    stride: float  # gait phase in [0, 1)
    bbox: tuple[int, int, int, int]  # x, y, w, h in the camera frame
    occluder: str | None
    seed: tuple[int, ...]
    junk: bool = False


@dataclass(frozen=True)
class Site:
    config: SynthConfig
    identities: tuple[Identity, ...]
    cameras: tuple[Camera, ...]

    def identity(self, pid: int) -> Identity:
        return self.identities[pid - 1]

    def outfit(self, pid: int, clothes_id: int) -> Outfit:
        for outfit in self.identity(pid).outfits:
            if outfit.clothes_id == clothes_id:
                return outfit
        raise KeyError((pid, clothes_id))

    def ids(self, *splits: str, distractors: bool | None = None) -> list[int]:
        return [
            p.pid
            for p in self.identities
            if p.split in splits and (distractors is None or p.is_distractor == distractors)
        ]


# ----------------------------------------------------------------------------- sampling helpers


def _pick(
    rng: np.random.Generator, options: tuple[str, ...] | list[str], p: list[float] | None = None
) -> str:
    probs = None if p is None else np.asarray(p, dtype=float) / np.sum(p)
    return options[int(rng.choice(len(options), p=probs))]


def _jitter(rgb: Rgb, rng: np.random.Generator, amount: int = 12) -> Rgb:
    delta = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(rgb, delta, strict=True))  # pyright: ignore[reportReturnType]  (3 channels)


def _sample_traits(rng: np.random.Generator) -> BodyTraits:
    gender = _pick(rng, GENDERS)
    age = _pick(rng, AGES, [0.12, 0.42, 0.32, 0.14])
    female = gender == "female"
    senior = age == "senior"
    base_height = (164 if female else 177) - (8 if age == "teen" else 0) - (3 if senior else 0)
    hair_p = (
        [0.22, 0.42, 0.2, 0.16, 0.0]
        if female
        else [0.72, 0.06, 0.04, 0.0, 0.18 if senior else 0.06]
    )
    hair_style = _pick(rng, HAIR_STYLES, hair_p)
    colour_p = [0.25, 0.15, 0.05, 0.05, 0.5] if senior else [0.42, 0.32, 0.16, 0.07, 0.03]
    hair_colour = _pick(rng, tuple(HAIR_COLOURS), colour_p)
    skin_tone = _pick(rng, tuple(SKIN_TONES))
    return BodyTraits(
        gender=gender,
        age=age,
        build=_pick(rng, BUILDS, [0.3, 0.45, 0.25]),
        height_cm=int(np.clip(round(base_height + rng.normal(0, 7)), 145, 200)),
        skin_tone=skin_tone,
        skin_rgb=_jitter(SKIN_TONES[skin_tone], rng, 8),
        hair_style=hair_style,
        hair_colour=hair_colour,
        hair_rgb=_jitter(HAIR_COLOURS[hair_colour], rng, 10),
        posture=_pick(rng, POSTURES, [0.4, 0.35, 0.25] if senior else [0.6, 0.22, 0.18]),
        glasses=bool(rng.random() < (0.45 if senior else 0.22)),
    )


def _other_colour(rng: np.random.Generator, avoid: str) -> str:
    return _pick(rng, [c for c in COLOURS if c != avoid])


def _sample_outfit(rng: np.random.Generator, clothes_id: int, gender: str) -> Outfit:
    upper_colour = _pick(rng, tuple(COLOURS))
    secondary = _other_colour(rng, upper_colour)
    lower_p = [0.33, 0.3, 0.12, 0.25] if gender == "female" else [0.45, 0.4, 0.15, 0.0]
    lower_type = _pick(rng, LOWER_TYPES, lower_p)
    if lower_type == "jeans":
        lower_colour = _pick(rng, ("blue", "navy", "black", "grey"), [0.5, 0.25, 0.15, 0.1])
    else:
        lower_colour = _pick(rng, tuple(COLOURS))
    shoes = _pick(rng, SHOE_COLOURS)
    backpack = bool(rng.random() < 0.3)
    bag = bool(rng.random() < (0.12 if backpack else 0.32))
    return Outfit(
        clothes_id=clothes_id,
        upper_type=_pick(rng, UPPER_TYPES, [0.3, 0.2, 0.2, 0.15, 0.15]),
        upper_colour=upper_colour,
        upper_rgb=_jitter(COLOURS[upper_colour], rng),
        upper_pattern=_pick(rng, PATTERNS, [0.55, 0.2, 0.1, 0.15]),
        secondary_colour=secondary,
        secondary_rgb=_jitter(COLOURS[secondary], rng),
        lower_type=lower_type,
        lower_colour=lower_colour,
        lower_rgb=_jitter(COLOURS[lower_colour], rng),
        shoes_colour=shoes,
        shoes_rgb=_jitter(COLOURS[shoes], rng, 8),
        hat_colour=_pick(rng, tuple(COLOURS)) if rng.random() < 0.15 else None,
        bag_colour=_pick(rng, tuple(COLOURS)) if bag else None,
        backpack_colour=_pick(rng, tuple(COLOURS)) if backpack else None,
    )


def _sample_cameras_for(rng: np.random.Generator, config: SynthConfig) -> tuple[int, ...]:
    """Each person passes >=2 RGB cameras and >=1 IR camera, so every query has a match."""
    rgb = list(config.rgb_cameras)
    ir = list(config.ir_cameras)
    chosen = {c for c in range(config.n_cameras) if rng.random() < config.camera_coverage}
    while len(chosen & set(rgb)) < 2:
        chosen.add(rgb[int(rng.integers(len(rgb)))])
    if ir and not chosen & set(ir):
        chosen.add(ir[int(rng.integers(len(ir)))])
    return tuple(sorted(chosen))


def _sample_camera(rng: np.random.Generator, index: int, config: SynthConfig) -> Camera:
    infrared = index in config.ir_cameras
    dominant = index % 3  # alternate cameras mostly see fronts, backs or sides
    probs = [0.2, 0.2, 0.2]
    probs[dominant] = 0.6
    lo, hi = config.scale_jitter
    return Camera(
        index=index,
        modality="infrared" if infrared else "rgb",
        view_probs=(probs[0], probs[1], probs[2]),
        person_px=float(config.crop_size[0] * rng.uniform(lo, hi)),
        horizon=int(FRAME_SIZE[1] * rng.uniform(0.3, 0.48)),
        indoor=bool(rng.random() < 0.35),
        resolution=float(rng.uniform(0.45, 1.0)),
        gain=float(rng.uniform(0.75, 1.2)),
        gamma=float(rng.uniform(0.85, 1.2)),
        tint=tuple(float(t) for t in rng.uniform(0.88, 1.12, size=3)),  # pyright: ignore[reportArgumentType]  (size=3)
        blur=float(rng.uniform(0.0, 0.9) + (0.5 if infrared else 0.0)),
        occlusion=float(min(1.0, config.occlusion_rate * rng.uniform(0.5, 1.5))),
        clutter=int(rng.integers(6, 18)),
    )


def _split_ids(rng: np.random.Generator, config: SynthConfig) -> dict[int, str]:
    n = config.n_identities
    order = [int(p) + 1 for p in rng.permutation(n)]
    n_train = min(n - 1, max(1, round(n * config.train_fraction)))
    n_val = min(n_train - 1, round(n_train * config.val_fraction))
    split = {pid: "test" for pid in order[n_train:]}
    split.update({pid: "train" for pid in order[: n_train - n_val]})
    split.update({pid: "val" for pid in order[n_train - n_val : n_train]})
    return split


def build_site(config: SynthConfig) -> Site:
    """Sample cameras and identities (regular, then distractors) for ``config``."""
    rng = np.random.default_rng([config.seed, TAG_SITE])
    cameras = tuple(_sample_camera(rng, i, config) for i in range(config.n_cameras))
    split = _split_ids(rng, config)
    lo, hi = config.outfits_per_identity
    identities: list[Identity] = []
    next_clothes = 1
    for pid in range(1, config.n_identities + 1):
        traits = _sample_traits(rng)
        k = int(rng.integers(lo, hi + 1))
        outfits = tuple(_sample_outfit(rng, next_clothes + j, traits.gender) for j in range(k))
        next_clothes += k
        cams = _sample_cameras_for(rng, config)
        identities.append(Identity(pid, split[pid], traits, outfits, cams))  # pyright: ignore[reportArgumentType]  (a split name)
    for d in range(config.n_distractors):
        pid = config.n_identities + d + 1
        target = identities[int(rng.integers(config.n_identities))]
        shares = DISTRACTOR_MODES[d % len(DISTRACTOR_MODES)]
        traits = target.traits if "traits" in shares else _sample_traits(rng)
        k = int(rng.integers(lo, hi + 1))
        outfits = [_sample_outfit(rng, next_clothes + j, traits.gender) for j in range(k)]
        if "outfit" in shares:  # same clothes as the target, but another person's clothes id
            copied = target.outfits[int(rng.integers(len(target.outfits)))]
            outfits[0] = Outfit(**{**copied.__dict__, "clothes_id": next_clothes})
        next_clothes += k
        cams = _sample_cameras_for(rng, config)
        identities.append(Identity(pid, "test", traits, tuple(outfits), cams, target.pid, shares))
    return Site(config=config, identities=tuple(identities), cameras=cameras)


# ----------------------------------------------------------------------------- sightings


@dataclass(frozen=True)
class TrackSpec:
    pid: int
    clothes_id: int
    camera: int
    day: int
    t0: float  # seconds since the site epoch
    length: int
    track_id: str
    seed: tuple[int, ...]
    reverse: bool = False  # walking the route backwards swaps front/back views
    frame_origin: float = 0.0  # time whose frame number is 0


def _bbox_size(
    rng: np.random.Generator, site: Site, cam: Camera, pid: int, side: bool
) -> tuple[int, int]:
    cfg = site.config
    lo, hi = cfg.scale_jitter
    base_h = cfg.crop_size[0]
    height = site.identity(pid).traits.height_cm
    h = cam.person_px * height / 175.0 * rng.uniform(0.9, 1.1)
    h = float(np.clip(h, base_h * lo, base_h * hi))
    aspect = cfg.crop_size[1] / cfg.crop_size[0] * rng.uniform(0.92, 1.08) * (1.06 if side else 1.0)
    return max(16, round(h * aspect)), max(32, round(h))


def make_track(site: Site, spec: TrackSpec, first_index: int) -> list[Sighting]:
    """Consecutive crops of one person crossing one camera's field of view."""
    rng = np.random.default_rng(list(spec.seed))
    cam = site.cameras[spec.camera]
    view = VIEWPOINTS[int(rng.choice(3, p=np.asarray(cam.view_probs)))]
    if spec.reverse and view != "side":
        view = "back" if view == "front" else "front"
    facing = 1 if rng.random() < 0.5 else -1
    w, h = _bbox_size(rng, site, cam, spec.pid, view == "side")
    fw, fh = FRAME_SIZE
    x = float(rng.uniform(0, fw - w))
    foot = float(rng.uniform(max(h + 1, cam.horizon + 0.25 * (fh - cam.horizon)), fh - 2))
    occluder = _pick(rng, OCCLUDERS) if rng.random() < cam.occlusion else None
    phase = float(rng.random())
    t = spec.t0
    out: list[Sighting] = []
    for k in range(spec.length):
        bw, bh = w, h
        out.append(
            Sighting(
                index=first_index + k,
                pid=spec.pid,
                clothes_id=spec.clothes_id,
                camera=spec.camera,
                day=spec.day,
                time_s=round(t, 3),
                frame=int((t - spec.frame_origin) * FPS) % 1_000_000,
                track_id=spec.track_id,
                track_pos=k,
                viewpoint=view,
                facing=facing,
                stride=(phase + 0.37 * k) % 1.0,
                bbox=(int(x), int(foot) - bh, bw, bh),
                occluder=occluder,
                seed=(*spec.seed, k),
            )
        )
        t += float(rng.uniform(0.2, 0.6))
        if view == "side":
            x += facing * w * rng.uniform(0.08, 0.16)
        else:  # walking towards (front) or away (back): grows or shrinks a little
            grow = 1.03 if view == "front" else 0.97
            lo, hi = (site.config.crop_size[0] * f for f in site.config.scale_jitter)
            new_h = int(np.clip(round(h * grow), math.ceil(lo), math.floor(hi)))
            w, h = max(16, round(w * new_h / h)), new_h
            x += w * rng.uniform(-0.04, 0.04)
            foot = min(fh - 2, foot + (6 if view == "front" else -6))
        x = float(np.clip(x, 0, fw - w))
        foot = float(np.clip(foot, h + 1, fh - 2))
    return out


def sample_sightings(site: Site) -> list[Sighting]:
    """Offline footage: per identity and camera, images in tracks of 1-3 crops.

    Tracks cycle through the identity's outfits (one outfit per recording day), so a person with
    several outfits is seen in different clothes, often by the same camera.
    """
    cfg = site.config
    rng = np.random.default_rng([cfg.seed, TAG_SIGHTINGS])
    lo, hi = cfg.images_per_camera
    sightings: list[Sighting] = []
    n_tracks = 0
    for ident in site.identities:
        k = len(ident.outfits)
        start = int(rng.integers(k))
        person_tracks = 0
        for cam in ident.cameras:
            remaining = int(rng.integers(lo, hi + 1))
            while remaining > 0:
                length = min(remaining, int(rng.integers(1, 4)))
                day = (start + person_tracks) % k
                t0 = day * 86400.0 + DAY_START_S + float(rng.uniform(0, DAY_LENGTH_S - 30))
                spec = TrackSpec(
                    pid=ident.pid,
                    clothes_id=ident.outfits[day].clothes_id,
                    camera=cam,
                    day=day,
                    t0=t0,
                    length=length,
                    track_id=f"t{n_tracks:05d}",
                    seed=(cfg.seed, TAG_RENDER, n_tracks),
                    frame_origin=day * 86400.0 + DAY_START_S,
                )
                sightings.extend(make_track(site, spec, len(sightings)))
                remaining -= length
                person_tracks += 1
                n_tracks += 1
    sightings.extend(_junk_sightings(site, rng, len(sightings), n_tracks))
    return sightings


def _junk_sightings(
    site: Site, rng: np.random.Generator, first: int, first_track: int
) -> list[Sighting]:
    """Bad detections (Market pid -1): rendered normally, cut badly by the renderer."""
    cfg = site.config
    out: list[Sighting] = []
    rgb = cfg.rgb_cameras
    for j in range(cfg.junk_images):
        pid = int(rng.integers(1, len(site.identities) + 1))
        ident = site.identity(pid)
        cam = rgb[int(rng.integers(len(rgb)))]
        day = int(rng.integers(len(ident.outfits)))
        spec = TrackSpec(
            pid=pid,
            clothes_id=ident.outfits[day].clothes_id,
            camera=cam,
            day=day,
            t0=day * 86400.0 + DAY_START_S + float(rng.uniform(0, DAY_LENGTH_S - 30)),
            length=1,
            track_id=f"t{first_track + j:05d}",
            seed=(cfg.seed, TAG_RENDER, first_track + j),
            frame_origin=day * 86400.0 + DAY_START_S,
        )
        (s,) = make_track(site, spec, first + j)
        out.append(Sighting(**{**s.__dict__, "junk": True}))
    return out


# ----------------------------------------------------------------------------- annotations


def height_class(height_cm: int) -> str:
    return "short" if height_cm < 160 else "tall" if height_cm >= 182 else "medium"


def image_attributes(site: Site, s: Sighting) -> dict[str, object]:
    """Per-image annotation: what an annotator sees in this crop (viewpoint-dependent)."""
    ident = site.identity(s.pid)
    t, o = ident.traits, site.outfit(s.pid, s.clothes_id)
    accessories: dict[str, str] = {}
    if o.hat_colour:
        accessories["hat"] = o.hat_colour
    if t.glasses and s.viewpoint != "back":  # glasses need a face
        accessories["glasses"] = "black"
    if o.bag_colour:
        accessories["bag"] = o.bag_colour
    if o.backpack_colour:
        accessories["backpack"] = o.backpack_colour
    pattern = o.upper_pattern
    if pattern == "logo" and s.viewpoint != "front":  # a chest print is invisible from behind
        pattern = "solid"
    return {
        "gender": t.gender,
        "age": t.age,
        "age_range": AGE_RANGES[t.age],
        "build": t.build,
        "height": height_class(t.height_cm),
        "skin_tone": t.skin_tone,
        "hair_style": t.hair_style,
        "hair_colour": "none" if t.hair_style == "bald" else t.hair_colour,
        "upper_type": o.upper_type,
        "upper_colour": o.upper_colour,
        "upper_pattern": pattern,
        "upper_secondary_colour": o.secondary_colour,
        "lower_type": o.lower_type,
        "lower_colour": o.lower_colour,
        "shoes_colour": o.shoes_colour,
        "accessories": sorted(accessories),
        "accessory_colours": dict(sorted(accessories.items())),
        "posture": t.posture,
        "viewpoint": s.viewpoint,
        "occluded": s.occluder is not None,
        "occluder": s.occluder,
    }


# ----------------------------------------------------------------------------- captions

_NOUNS = {
    ("male", "teen"): ("boy", "teenage boy", "young man"),
    ("female", "teen"): ("girl", "teenage girl", "young woman"),
    ("male", "senior"): ("older man", "elderly man", "old man"),
    ("female", "senior"): ("older woman", "elderly woman", "old lady"),
    ("male", ""): ("man", "guy", "gentleman", "male pedestrian"),
    ("female", ""): ("woman", "lady", "female pedestrian"),
}
_BUILD_ADJ = {"slim": ("slim", "thin", "slender"), "heavy": ("heavy-set", "stocky", "heavy")}
_UPPER = {
    "t-shirt": ("t-shirt", "tee", "short-sleeved top"),
    "shirt": ("long-sleeved shirt", "shirt", "button-up shirt"),
    "jacket": ("jacket", "zip-up jacket"),
    "hoodie": ("hoodie", "hooded sweatshirt"),
    "coat": ("long coat", "coat", "overcoat"),
}
_LOWER = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim jeans"),
    "shorts": ("shorts",),
    "skirt": ("skirt", "knee-length skirt"),
}
_SHOES = ("shoes", "sneakers", "trainers")
_COLOUR_SYNONYMS = {
    "grey": ("grey", "gray"),
    "navy": ("navy", "dark blue"),
    "beige": ("beige", "tan"),
}
_VIEW = {
    "front": ("walking towards the camera", "facing the camera"),
    "back": ("walking away from the camera", "seen from behind"),
    "side": ("seen from the side", "walking past", "shown in profile"),
}
_OCCLUDER = {"pole": "a pole", "car": "a car", "person": "another person", "sign": "a sign"}


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


class _Phrases:
    """Noun phrases for one caption, with synonyms drawn from ``rng``."""

    def __init__(self, a: dict[str, object], rng: np.random.Generator) -> None:
        self.rng = rng
        self.a = a
        age = str(a["age"])
        key = (str(a["gender"]), age if age in ("teen", "senior") else "")
        self.noun = self.choose(_NOUNS[key])
        adj = []
        if a["build"] in _BUILD_ADJ and rng.random() < 0.6:
            adj.append(self.choose(_BUILD_ADJ[str(a["build"])]))
        if a["height"] != "medium" and rng.random() < 0.5:
            adj.append(str(a["height"]))
        if age == "young" and rng.random() < 0.4:
            adj.append("young")
        self.subject = _an(", ".join(adj[::-1]) + " " + self.noun if adj else self.noun)
        self.pronoun = "he" if a["gender"] == "male" else "she"
        self.possessive = "his" if a["gender"] == "male" else "her"

    def choose(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def colour(self, name: object) -> str:
        return self.choose(_COLOUR_SYNONYMS.get(str(name), (str(name),)))

    def hair(self) -> str:
        style, colour = self.a["hair_style"], self.colour(self.a["hair_colour"])
        if style == "bald":
            return self.choose(("a bald head", "a shaved head"))
        if style == "ponytail":
            return f"{colour} hair tied in a ponytail"
        if style == "bun":
            return f"{colour} hair in a bun"
        return f"{style} {colour} hair"

    def upper(self) -> str:
        a = self.a
        kind = self.choose(_UPPER[str(a["upper_type"])])
        colour, second = self.colour(a["upper_colour"]), self.colour(a["upper_secondary_colour"])
        pattern = a["upper_pattern"]
        if pattern == "striped":
            return _an(f"{colour} and {second} striped {kind}")
        if pattern == "checked":
            return _an(f"{colour} {self.choose(('checked', 'plaid'))} {kind}")
        if pattern == "logo":
            return _an(f"{colour} {kind} with a {second} logo on the front")
        return _an(f"{colour} {kind}")

    def lower(self) -> str:
        kind = str(self.a["lower_type"])
        phrase = f"{self.colour(self.a['lower_colour'])} {self.choose(_LOWER[kind])}"
        return _an(phrase) if kind == "skirt" else phrase

    def shoes(self) -> str:
        return f"{self.colour(self.a['shoes_colour'])} {self.choose(_SHOES)}"

    def accessories(self) -> list[str]:
        colours: dict[str, str] = self.a["accessory_colours"]  # pyright: ignore[reportAssignmentType]  (sampled so)
        out = []
        if "backpack" in colours:
            c = self.colour(colours["backpack"])
            out.append(
                self.choose((f"carries {_an(c)} backpack", f"has {_an(c)} backpack on the back"))
            )
        if "bag" in colours:
            c = self.colour(colours["bag"])
            out.append(
                self.choose(
                    (f"carries {_an(c)} shoulder bag", f"has {_an(c)} bag over one shoulder")
                )
            )
        if "hat" in colours:
            c = self.colour(colours["hat"])
            out.append(self.choose((f"wears {_an(c)} cap", f"has {_an(c)} hat on")))
        if "glasses" in colours:
            out.append(self.choose(("wears glasses", "has glasses on")))
        self.rng.shuffle(out)  # type: ignore[arg-type]
        return out

    def extras(self) -> str:
        """Optional trailing sentence: viewpoint, posture, occlusion."""
        bits = []
        if self.rng.random() < 0.6:
            bits.append(f"{_cap(self.pronoun)} is {self.choose(_VIEW[str(self.a['viewpoint'])])}")
        if self.a["posture"] == "slouched" and self.rng.random() < 0.5:
            bits.append(
                f"{_cap(self.pronoun)} {self.choose(('walks with a slight stoop', 'is slouching'))}"
            )
        if self.a["occluder"] and self.rng.random() < 0.7:
            bits.append(f"The view is partly blocked by {_OCCLUDER[str(self.a['occluder'])]}")
        return " ".join(b + "." for b in bits)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _template(p: _Phrases, form: int) -> str:
    acc = p.accessories()
    acc_sentence = f" {_cap(p.pronoun)} {_join(acc)}." if acc else ""
    shoes = p.shoes() if p.rng.random() < 0.75 else ""
    if form == 0:
        tail = f", with {shoes}" if shoes else ""
        body = f"{_cap(p.subject)} with {p.hair()} is wearing {p.upper()} and {p.lower()}{tail}."
    elif form == 1:
        clothes = _join([p.upper(), p.lower()] + ([shoes] if shoes else []))
        body = f"{_cap(p.subject)} wearing {clothes}. {_cap(p.pronoun)} has {p.hair()}."
    elif form == 2:
        clothes = _join([p.upper(), p.lower()] + ([shoes] if shoes else []))
        body = f"This {p.noun} has {p.hair()}. {_cap(p.pronoun)} wears {clothes}."
    elif form == 3:
        body = f"The {p.noun} is dressed in {p.upper()} and {p.lower()}."
        body += f" {_cap(p.pronoun)} has {p.hair()}."
        if shoes:
            body += f" {_cap(p.pronoun)} is wearing {shoes}."
    else:
        body = f"{_cap(p.subject)} in {p.lower()} and {p.upper()}, with {p.hair()}."
        if shoes:
            body += f" On {p.possessive} feet are {shoes}."
    extras = p.extras()
    return body + acc_sentence + (f" {extras}" if extras else "")


N_TEMPLATES = 5


def make_captions(attributes: dict[str, object], rng: np.random.Generator, n: int = 2) -> list[str]:
    """``n`` captions of one image, each with its own template so wording differs."""
    forms = rng.permutation(N_TEMPLATES)
    return [_template(_Phrases(attributes, rng), int(forms[i % N_TEMPLATES])) for i in range(n)]


def captions_for(site: Site, s: Sighting, attributes: dict[str, object]) -> list[str]:
    rng = np.random.default_rng([site.config.seed, TAG_CAPTION, s.index])
    return make_captions(attributes, rng, site.config.captions_per_image)


_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """CUHK-PEDES ``processed_tokens`` style: lowercase words, punctuation dropped."""
    return _TOKEN.findall(caption.lower())
