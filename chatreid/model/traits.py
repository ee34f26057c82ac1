"""What survives a change of clothes: a reader of persistent body traits from a person crop.

Why it exists. A cloth-changing query asks for a person in *other* clothes, so everything an
embedder trained on identities learns first (garment colours and shapes) misleads it. On the
synthetic world the trained prefilter and the imported OSNet stay near chance there, yet the
people differ visibly in what the world keeps fixed per person: skin tone, hair colour and
style, gender, build, age. Reading those is the paper's stage-1 lesson (attribute captioning
before retrieval); identity labels from a few dozen people do not teach it, attribute labels do,
because every train crop shows the same few values of each trait.

* **reader**: a small CNN over the crop's head-and-shoulders band (``HEAD_BAND``: person crops
  are head to foot) with one softmax per trait (``TRAITS``), trained on the attribute labels of
  the train people (``attributes/identities.json``), the camera colour casts simulated;
* **match**: ``sum_t log(p_t(a) . p_t(b) + eps)``, the log-probability that two crops show the
  same value of every trait, comparable across a gallery like a cosine;
* **saved** as ``traits.safetensors`` + ``traits.json`` (vocabulary, settings, version); a
  reader whose vocabulary differs from this code's is refused, never read with shifted labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from chatreid.data.instructions.samples import ImageEntry, unique_sightings
from chatreid.synth.world import AGES, BUILDS, GENDERS, HAIR_COLOURS, HAIR_STYLES, SKIN_TONES

# Trait -> its values, in label order (the synthetic world's vocabulary).
TRAITS: dict[str, tuple[str, ...]] = {
    "skin_tone": tuple(SKIN_TONES), "hair_colour": (*HAIR_COLOURS, "none"),  # none: bald
    "hair_style": HAIR_STYLES, "gender": GENDERS, "build": BUILDS, "age": AGES}
WEIGHTS_FILE = "traits.safetensors"
CONFIG_FILE = "traits.json"
_EPS = 1e-3  # floor of a trait's agreement: one misread trait costs, never vetoes


class TraitError(ValueError):
    """A reader that does not fit this code, or labels it cannot learn from."""


class TraitReaderConfig(BaseModel):
    """How the trait reader is built and trained."""

    head_band: float = Field(default=0.3, gt=0, le=1, description=(
        "top share of the crop the reader sees (head and shoulders of a head-to-foot crop)"))
    width: int = Field(default=48, ge=8, description="width the band is resized to (pixels)")
    height: int = Field(default=28, ge=8, description="height the band is resized to (pixels)")
    epochs: int = Field(default=15, ge=1, description="passes over the labelled crops")
    batch_size: int = Field(default=64, ge=1, description="crops per step")
    lr: float = Field(default=3e-3, gt=0, description="peak learning rate (one-cycle)")
    seed: int = Field(default=0, description="initialisation and shuffling seed")


@dataclass(frozen=True)
class LabelledCrop:
    """A train crop (a key its loader opens) and its person's traits (value names, as
    ``TRAITS`` spells them)."""

    key: str
    traits: Mapping[str, str]


class TraitNet(nn.Module):
    """Four conv blocks, global average pooling, one linear classifier per trait."""

    def __init__(self, sizes: Sequence[int], widths: Sequence[int] = (32, 64, 96, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inp = 3
        for i, out in enumerate(widths):
            layers += [nn.Conv2d(inp, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            inp = out
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(inp, n) for n in sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pooled = self.features(x).mean((2, 3))
        return [head(pooled) for head in self.heads]


class TraitReader:
    """Crops to trait probabilities, and the agreement of two crops' traits."""

    def __init__(self, net: TraitNet, config: TraitReaderConfig) -> None:
        self.net = net.eval()
        self.config = config
        self.sizes = [len(v) for v in TRAITS.values()]

    @property
    def version(self) -> str:
        """``traits-`` + a hash of the weights: another training, another version."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        return "traits-" + digest.hexdigest()[:12]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, height, width) in [0, 1]: each crop's head band, resized."""
        cfg = self.config
        return torch.stack([_band(img, cfg) for img in images])

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image], batch_size: int = 128) -> np.ndarray:
        """(N, sum of the traits' value counts): each trait's probabilities, side by side."""
        if not images:
            return np.zeros((0, sum(self.sizes)), dtype=np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            logits = self.net(self.pixels(images[start:start + batch_size]))
            out.append(torch.cat([F.softmax(lg, 1) for lg in logits], 1))
        return torch.cat(out).numpy().astype(np.float32)

    def describe(self, image: Image.Image) -> dict[str, str]:
        """The most likely value of each trait."""
        probs = self.split(self.read([image]))
        return {t: TRAITS[t][int(p[0].argmax())] for t, p in probs.items()}

    def split(self, read: np.ndarray) -> dict[str, np.ndarray]:
        """``read``'s columns per trait."""
        bounds = np.cumsum([0, *self.sizes])
        return {t: read[:, a:b] for t, a, b in zip(TRAITS, bounds[:-1], bounds[1:], strict=True)}

    def match(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(len(a), len(b)): log-probability that the two crops agree on every trait."""
        pa, pb = self.split(a), self.split(b)
        return np.sum([np.log(pa[t] @ pb[t].T + _EPS) for t in TRAITS], axis=0)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()},
                  folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(
            {"version": self.version, "traits": TRAITS, "config": self.config.model_dump()},
            indent=1))

    @classmethod
    def load(cls, folder: Path) -> TraitReader:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        if {k: list(v) for k, v in meta["traits"].items()} != {
                k: list(v) for k, v in TRAITS.items()}:
            raise TraitError(f"{folder}: the reader was trained on another trait vocabulary "
                             f"({sorted(meta['traits'])}); train it again")
        reader = cls(TraitNet([len(v) for v in TRAITS.values()]),
                     TraitReaderConfig(**meta["config"]))
        reader.net.load_state_dict(load_file(folder / WEIGHTS_FILE))
        if reader.version != meta["version"]:
            raise TraitError(f"{folder}: weights do not match the version recorded beside them")
        return reader


def _band(img: Image.Image, cfg: TraitReaderConfig) -> torch.Tensor:
    img = img.convert("RGB")
    w, h = img.size
    band = img.crop((0, 0, w, max(1, round(h * cfg.head_band))))
    band = band.resize((cfg.width, cfg.height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(band, dtype=np.float32) / 255).permute(2, 0, 1)


def labelled_crops(entries: Iterable[ImageEntry], absolute: bool = False) -> list[LabelledCrop]:
    """The RGB crops among a world's annotated ``entries`` (one copy of each), keyed by their
    world-relative path (``absolute``: their file path), with the traits stage 1's attribute
    annotations state."""
    return [LabelledCrop(e.path if absolute else e.relpath,
                         {t: str(e.attributes[t]) for t in TRAITS})
            for e in unique_sightings(entries) if e.modality == "rgb"]


def _labels(crops: Iterable[LabelledCrop]) -> np.ndarray:
    try:
        return np.array([[TRAITS[t].index(c.traits[t]) for t in TRAITS] for c in crops])
    except (KeyError, ValueError) as err:
        raise TraitError(f"a crop's traits are outside the reader's vocabulary: {err}") from err


def _camera_casts(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-crop gain, offset and saturation, and a mirror: cameras differ in colour."""
    n = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    grey = x.mean(1, keepdim=True)
    x = (grey + (x - grey) * uniform(0.4, 1.2, 1, 1, 1)) * uniform(0.75, 1.25, 3, 1, 1)
    x = x + uniform(-0.08, 0.08, 3, 1, 1)
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    return x.clamp(0, 1)


def train_trait_reader(crops: Sequence[LabelledCrop], load: Callable[[str], Image.Image],
                       config: TraitReaderConfig | None = None,
                       progress: Callable[[int, float], None] | None = None) -> TraitReader:
    """A reader trained on ``crops``, each opened by ``load(key)`` (cross-entropy per trait,
    summed); ``progress(epoch, loss)`` after each epoch."""
    config = config or TraitReaderConfig()
    if not crops:
        raise TraitError("no labelled crops to train the trait reader on")
    labels = torch.from_numpy(_labels(crops))
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    reader = TraitReader(TraitNet([len(v) for v in TRAITS.values()]), config)
    images = []
    for c in crops:
        with load(c.key) as img:
            images.append(_band(img, config))
    pixels = torch.stack(images)
    steps = -(-len(crops) // config.batch_size)
    net = reader.net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps)
    for epoch in range(config.epochs):
        order = torch.randperm(len(crops), generator=gen)
        total = 0.0
        for start in range(0, len(crops), config.batch_size):
            idx = order[start:start + config.batch_size]
            logits = net(_camera_casts(pixels[idx], gen))
            loss = torch.stack([F.cross_entropy(lg, labels[idx, t])
                                for t, lg in enumerate(logits)]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if progress is not None:
            progress(epoch, total / len(crops))
    net.eval()
    return reader
