"""Metric learning for the prefilter embedder (the paper's prefilter baseline).

BNNeck recipe (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-ID"): a
backbone, an optional projection, a BatchNorm neck; batch-hard triplet loss on the features
*before* the neck, label-smoothed cross entropy on a classifier *after* it; batches of P
identities x K images. At inference the classifier is dropped and the neck's output
(L2-normalised) is the embedding.

Data: the synthetic world's train split (Market-1501 layout) and/or real images (the CUHK03
pair-1 layout's ``train/``), identities kept apart per source. Starts (``start``):

* ``imagenet`` or a torch embedder checkpoint: the MobileNetV2 backbone trains with its head;
  optionally it also learns the batch's pairwise similarities from an ONNX ``teacher``
  (relational distillation: the ONNX graph itself cannot be trained);
* an ONNX model / imported checkpoint: the graph stays frozen and a head (a projection
  initialised to the identity, plus the neck) trains on its features - computed once, the
  ranks sharing the work - so the result starts exactly where the import stood.

Pieces, small and separately testable:

* :class:`IdentityDataset` - the train images, decoded once to uint8 at the input size;
* :class:`PKSampler` - P x K index batches, the same global sequence on every rank, each rank
  taking its own slice, so ranks see disjoint batches and run the same number of steps;
* :func:`triplet_hard_loss`, :func:`augment` - loss and flip / pad-crop on whole batches;
* :func:`train_embedder_loop` - the Ray Train per-worker loop (DDP; resumes from the last
  reported checkpoint; rank 0 evaluates and writes the embedder at the end);
* :func:`evaluate_embedder` - rank-1/5/10 and mAP on the query/gallery split, for any embedder;
  :func:`evaluate_parts` - the synthetic and the real validation parts and their mean.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import Sampler

from chatreid.embedder.embedder import (
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    CHECKPOINT_FILE,
    Embedder,
    EmbeddingHead,
    ReIDNet,
    _to_rgb,
    imagenet_model,
)
from chatreid.metrics import compute_distmat, evaluate_rank

if TYPE_CHECKING:
    from chatreid.embedder.onnx import OnnxEmbedder
    from chatreid.synth import SynthConfig

__all__ = [
    "HISTORY_FILE",
    "EmbedderTrainConfig",
    "IdentityDataset",
    "PKSampler",
    "augment",
    "evaluate_embedder",
    "evaluate_parts",
    "evaluate_real",
    "extra_world_config",
    "relational_distill_loss",
    "shared_features",
    "train_embedder_loop",
    "train_images",
    "train_split_hash",
    "triplet_hard_loss",
]

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # model + optimiser + schedule: what a restarted worker resumes
HISTORY_FILE = "history.json"  # per-epoch metrics, for the report and the tests
EXTRA_SEED_OFFSET = 2_000_005_000  # the embedder's extra people; the fit world is 1_000_003_000


class EmbedderTrainConfig(BaseModel):
    """Plain data: one embedder training run (also pushed as the checkpoint's config)."""

    model_config = ConfigDict(extra="forbid")

    world_root: Path | None = Field(
        default=None,
        description="synthetic world (Market-1501 layout, or market1501/ inside): its "
        "train split is trained on, its query/gallery split evaluated")
    real_root: Path | None = Field(
        default=None,
        description="real images in the CUHK03 pair-1 layout (train/, val/): train/ is "
        "trained on, val/ evaluated (camera A -> B and B -> A, averaged)")
    extra_worlds: list[Path] = Field(
        default_factory=list,
        description="further synthetic worlds (Market-1501 layout) whose train split is "
        "trained on too: more people, each world's kept apart from the others'; never evaluated "
        "here (see `extra_world_config`)")
    start: str = Field(
        default="imagenet",
        description="'imagenet'; a torch embedder checkpoint (file, directory or "
        "version): trained on; an .onnx model or imported ONNX checkpoint (path or version): "
        "frozen, a head trains on its features")
    start_card: str | None = Field(default=None, description="card of an .onnx `start` file")
    teacher: str | None = Field(
        default=None, description="an ONNX Re-ID model (file, directory or version) whose pairwise "
        "similarities a torch student also learns (relational distillation)")
    teacher_card: str | None = Field(default=None, description="card of an .onnx `teacher` file")
    distill_weight: float = Field(default=1.0, ge=0, description="weight of the distillation loss")
    epochs: int = Field(default=10, ge=1)
    p: int = Field(default=8, ge=2, description="identities per batch (per rank)")
    k: int = Field(default=4, ge=2, description="images per identity in a batch")
    steps_per_epoch: int | None = Field(
        default=None, ge=1, description="per rank; default: one pass over the train images"
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="stop after this many steps in all")
    lr: float = Field(default=3.5e-4, gt=0)
    head_lr_mult: float = Field(default=10.0, gt=0, description="lr factor for the fresh layers")
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    triplet_margin: float = Field(default=0.3, gt=0)
    triplet_weight: float = Field(default=1.0, ge=0)
    height: int = Field(default=256, ge=32)
    width: int = Field(default=128, ge=32)
    projection_dim: int | None = Field(
        default=None, ge=8, description="Linear projection before the neck; None keeps the 1280-d "
        "features (better on small data: a fresh projection discards ImageNet's features)")
    flip: bool = True
    pad: int | None = Field(default=None, ge=0, description="pad-crop pixels; default height // 16")
    seed: int = 0
    eval_batch_size: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _has_data(self) -> EmbedderTrainConfig:
        if self.world_root is None and self.real_root is None:
            raise ValueError("give world_root (synthetic), real_root (real images) or both")
        return self

    @property
    def pad_px(self) -> int:
        return self.height // 16 if self.pad is None else self.pad


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _market(world_root: Path):
    # imported on use: the chatreid.data package also loads the data engine (Ray Data)
    from chatreid.data.datasets.market1501 import Market1501

    return Market1501(world_root)


def _real(real_root: Path, direction: Literal["a2b", "b2a"] = "a2b"):
    from chatreid.data.datasets.cuhk03_pair1 import CUHK03Pair1

    return CUHK03Pair1(real_root, direction=direction)


@dataclass(frozen=True)
class TrainImage:
    path: Path
    identity: str  # "<source>/<pid>": people of different sources never share a label
    camid: int


def train_images(world_root: Path | None = None, real_root: Path | None = None,
                 extra_worlds: Sequence[Path] = ()) -> list[TrainImage]:
    """Every train image of the configured sources, in a stable order."""
    images: list[TrainImage] = []
    for source, root in _synthetic_sources(world_root, extra_worlds).items():
        images += [TrainImage(r.path, f"{source}/{r.pid}", r.camid)
                   for r in _market(root).train]
    if real_root is not None:
        images += [TrainImage(r.path, f"real/{r.pid}", r.camid)
                   for r in _real(Path(real_root)).train]
    return images


def _synthetic_sources(world_root: Path | None, extra_worlds: Sequence[Path]
                       ) -> dict[str, Path]:
    """Label prefix -> world: ``synthetic`` for the evaluated world, ``extra1``, ``extra2``, ...
    for the others (pid 7 of two worlds is two people)."""
    sources = {"synthetic": Path(world_root)} if world_root is not None else {}
    sources.update({f"extra{n}": Path(root) for n, root in enumerate(extra_worlds, 1)})
    return sources


def extra_world_config(training: SynthConfig, people: int) -> SynthConfig:
    """A world of ``people`` more train identities for the embedder: the training world's
    cameras and rendering, other people (a seed far from the training, fit and anyone's own
    worlds), each in two or three outfits so that a person is learnt across clothes, no
    distractors, nearly all of them in the train split (its test split is never used)."""
    return training.model_copy(update={
        "seed": training.seed + EXTRA_SEED_OFFSET, "n_identities": people, "n_distractors": 0,
        "outfits_per_identity": (2, 3), "train_fraction": 0.9})


def train_split_hash(world_root: Path | None = None, real_root: Path | None = None,
                     extra_worlds: Sequence[Path] = ()) -> str:
    """sha256 over the train images: source, relative path, identity, camera and content hash
    of each, so a changed label or a changed pixel gives another data hash."""
    digest = hashlib.sha256()
    roots: dict[str, Path | None] = {**_synthetic_sources(world_root, extra_worlds),
                                     "real": real_root}
    for img in sorted(train_images(world_root, real_root, extra_worlds),
                      key=lambda i: (i.identity, i.path)):
        source = img.identity.split("/", 1)[0]
        content = hashlib.sha256(img.path.read_bytes()).hexdigest()
        root = roots[source]
        rel = img.path.relative_to(Path(root)) if root else img.path.name
        digest.update(f"{source}\t{rel}\t{img.identity}\t{img.camid}\t{content}\n".encode())
    return digest.hexdigest()


def load_pixels(path: Path, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8, decoded and resized exactly as :meth:`Embedder.preprocess` does."""
    with Image.open(path) as img:
        img = _to_rgb(img)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(img)


class IdentityDataset:
    """Train images with labels 0..C-1 by sorted identity; pixels decoded once (uint8,
    N x 3 x H x W) unless ``decode=False`` (a frozen ONNX start reads features instead).

    Holding the pixels keeps a CPU step free of JPEG decoding; Market-1501's 12,936 train
    images take 1.3 GB at 256x128 (per worker).
    """

    def __init__(self, images: Sequence[TrainImage], height: int, width: int,
                 decode: bool = True) -> None:
        if not images:
            raise ValueError("no train images")
        self.paths = [i.path for i in images]
        identities = sorted({i.identity for i in images})
        self.identity_to_label = {key: n for n, key in enumerate(identities)}
        self.labels = np.array([self.identity_to_label[i.identity] for i in images],
                               dtype=np.int64)
        self.images: torch.Tensor | None = None
        if decode:
            pixels = np.stack([load_pixels(p, height, width) for p in self.paths])
            self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    @property
    def num_classes(self) -> int:
        return len(self.identity_to_label)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        assert self.images is not None, "pixels were not decoded"
        return self.images[idx], torch.from_numpy(self.labels)[idx]


class PKSampler(Sampler[list[int]]):
    """Batches of ``p`` identities x ``k`` images, deterministic per (seed, epoch).

    As in torchreid's RandomIdentitySampler, each identity's images are shuffled and cut into
    groups of ``k`` (an identity with fewer than ``k`` images is drawn with replacement), and
    each batch takes one group from each of ``p`` identities picked at random among those with
    groups left. Passes repeat until every rank has ``steps`` batches. Every rank builds the
    same global list and takes batches ``rank, rank + world_size, ...``: disjoint, equal counts.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, p: int, k: int, *,
                 steps: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            by_label[int(label)].append(i)
        if len(by_label) < 2:
            raise ValueError("P x K sampling needs at least 2 identities")
        if p > len(by_label):
            log.warning("p=%d but only %d identities: using p=%d", p, len(by_label), len(by_label))
        self.by_label = {label: np.array(ix) for label, ix in sorted(by_label.items())}
        self.p, self.k = min(p, len(by_label)), k
        self.steps = steps or max(1, math.ceil(len(labels) / (self.p * k * world_size)))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        yield from batches[self.rank :: self.world_size][: self.steps]

    def _global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        while len(batches) < self.steps * self.world_size:
            batches.extend(self._one_pass(rng))
        return batches

    def _one_pass(self, rng: np.random.Generator) -> list[list[int]]:
        groups: dict[int, list[np.ndarray]] = {}
        for label, ix in self.by_label.items():
            ix = rng.choice(ix, self.k, replace=True) if len(ix) < self.k else rng.permutation(ix)
            groups[label] = [ix[i : i + self.k] for i in range(0, len(ix) - self.k + 1, self.k)]
        batches = []
        while True:
            ready = [label for label, g in groups.items() if g]
            if len(ready) < self.p:
                return batches
            chosen = rng.choice(ready, self.p, replace=False)
            batches.append([int(i) for label in chosen for i in groups[int(label)].pop()])


def augment(images: torch.Tensor, *, pad: int, flip: bool,
            generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and pad-then-crop (translation) on a normalised batch.

    The padding is zero, i.e. the mean colour after normalisation. (Random erasing was tried:
    on the synthetic worlds' short runs it lowered mAP, so it is not here.)
    """
    n, _, h, w = images.shape
    out = images
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mirror.view(n, 1, 1, 1), out.flip(3), out)
    if pad:
        padded = F.pad(out, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        out = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in
                           enumerate(zip(dy, dx, strict=True))])
    return out


def _read(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy()  # detached from the file, which closes here


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, with :meth:`Embedder.preprocess`'s ImageNet statistics."""
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


# --------------------------------------------------------------------------------------------
# Model and losses
# --------------------------------------------------------------------------------------------


class TrainNet(nn.Module):
    """A trunk (the MobileNetV2 backbone, or nothing when the inputs are frozen ONNX features)
    and a BNNeck head, plus the identity classifier used only while training."""

    def __init__(self, trunk: nn.Module, head: EmbeddingHead | None, num_classes: int) -> None:
        super().__init__()
        if head is None or head.bn is None:
            raise ValueError("training needs the BNNeck head (bnneck=True)")
        self.trunk, self.head = trunk, head
        self.classifier = nn.Linear(head.out_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)  # BNNeck's init: small logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-neck features for the triplet loss, logits for the identity loss)."""
        feats = self.trunk(x)
        if self.head.proj is not None:
            feats = self.head.proj(feats)
        assert self.head.bn is not None  # __init__ refuses a head without its neck
        return feats, self.classifier(self.head.bn(feats))


def identity_head(dim: int) -> EmbeddingHead:
    """A projection initialised to the identity, then the neck: training on frozen features
    starts from the features themselves (cosine ranking unchanged until it learns)."""
    head = EmbeddingHead(dim, dim, bnneck=True)
    assert head.proj is not None  # a projection_dim gives one
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(dim))
    return head


def relational_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the batch's cosine-similarity matrices (Park et al., "Relational Knowledge
    Distillation", 2019): no shared dimension needed between student and teacher."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return F.mse_loss(s @ s.T, t @ t.T)


def triplet_hard_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances: for each anchor
    its farthest positive and nearest negative in the batch."""
    dist = torch.cdist(feats, feats).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine down to 1 % at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def model_id_for(net: ReIDNet) -> str:
    """A name for the trained weights: the content hash of the state dict, so the same result
    always gets the same version and different weights never share one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"reid-mobilenetv2-{net.dim}d-{digest.hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_embedder(embedder: Embedder, world_root: Path | str, max_rank: int = 50,
                      split: Literal["test", "train"] = "test") -> dict[str, float]:
    """Rank-1/5/10 and mAP of ``embedder`` (cosine) on the Market-1501 query/gallery split, or
    with ``split="train"`` on the identities it was trained on: every train image queries the
    others (the protocol's same-camera rule drops the image itself). The first measures
    generalisation to unseen people, the second whether training took hold at all."""
    ds = _market(Path(world_root))
    query, gallery = (ds.query, ds.gallery) if split == "test" else (ds.train, ds.train)
    if not query or not gallery:
        raise ValueError(f"{world_root}: the {split} split has no query or gallery images")

    def features(records) -> np.ndarray:
        out = []
        for start in range(0, len(records), embedder.batch_size):
            out.append(embedder.embed([_read(r.path) for r in
                                       records[start : start + embedder.batch_size]]))
        return np.concatenate(out)

    qf = features(query)
    distmat = compute_distmat(qf, qf if gallery is query else features(gallery))
    cmc, mean_ap = evaluate_rank(
        distmat,
        np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
        max_rank=max_rank,
    )
    return {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
            "rank10": float(cmc[min(9, len(cmc) - 1)]), "mAP": mean_ap}


def evaluate_real(embedder, real_root: Path | str) -> dict[str, float]:
    """The ``cuhk03_pair1`` benchmark task (validation people, camera A -> B and B -> A,
    averaged), through the evaluation engine: the figure ``chatreid eval`` reports."""
    from chatreid.evaluation import BENCHMARKS, EvalConfig
    from chatreid.evaluation.runner import evaluate_task

    result = evaluate_task(BENCHMARKS["cuhk03_pair1"], Path(real_root), embedder.embed, None,
                           EvalConfig())
    summary = result.baseline.summary()
    return {k: float(summary[k]) for k in _SCORES}


_SCORES = ("rank1", "rank5", "rank10", "mAP")


def evaluate_parts(embedder, world_root: Path | None = None,
                   real_root: Path | None = None) -> dict[str, float]:
    """``synthetic/<score>`` (held-out synthetic people) and ``real/<score>`` (real validation
    people) for the parts configured, and each score's mean over them (``mAP``, ...)."""
    parts: dict[str, dict[str, float]] = {}
    if world_root is not None:
        parts["synthetic"] = evaluate_embedder(embedder, world_root)
    if real_root is not None:
        parts["real"] = evaluate_real(embedder, real_root)
    if not parts:
        raise ValueError("nothing to evaluate on: no world_root and no real_root")
    out = {f"{part}/{k}": v for part, scores in parts.items() for k, v in scores.items()}
    out.update({k: float(np.mean([p[k] for p in parts.values()])) for k in _SCORES})
    return out


def resolve_source(settings, source: str, card: str | None, workdir: Path):
    """A start or teacher: a local path (file or checkpoint directory) or a checkpoint
    version, pulled into ``workdir`` (kept: an ONNX start's graph is copied at the end)."""
    from chatreid.embedder.load import load_embedder

    path = Path(source)
    if not path.exists():
        from chatreid.checkpoints import find, pull

        event = find(settings, "embedder", source) if settings is not None else None
        if event is None or settings is None:
            raise FileNotFoundError(f"embedder {source!r}: no such file and no such checkpoint "
                                    "version")
        path = workdir / event.version.replace("/", "_").replace("@", "_")
        pull(settings, event, path)
    return load_embedder(path, card=card)


# --------------------------------------------------------------------------------------------
# The Ray Train loop
# --------------------------------------------------------------------------------------------


class EmbedderTrainer:
    """One worker's share of the run; ``train_embedder_loop`` builds and runs it."""

    def __init__(self, cfg: EmbedderTrainConfig, rank: int, world_size: int,
                 settings=None) -> None:
        import ray.train.torch

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        torch.manual_seed(cfg.seed)  # the same initial head on every rank (DDP also syncs it)
        # a pulled start/teacher lives here for the run (an ONNX start is copied at the end)
        self._workdir = tempfile.TemporaryDirectory(prefix="embedder-train-")
        workdir = Path(self._workdir.name)
        start = (None if cfg.start == "imagenet"
                 else resolve_source(settings, cfg.start, cfg.start_card, workdir))
        self.frozen = start if _is_onnx(start) else None
        if self.frozen is not None and cfg.teacher:
            raise ValueError("a teacher distils into a torch start (imagenet or a torch "
                             "checkpoint); an ONNX start is frozen already")
        images = train_images(cfg.world_root, cfg.real_root, cfg.extra_worlds)
        self.data = IdentityDataset(images, cfg.height, cfg.width, decode=self.frozen is None)
        self.sampler = PKSampler(self.data.labels, cfg.p, cfg.k, steps=cfg.steps_per_epoch,
                                 seed=cfg.seed, rank=rank, world_size=world_size)
        self.inputs = self.teacher = None
        if self.frozen is not None:  # frozen graph: a head learns on its (shared) features
            self.inputs = shared_features(self.frozen.features, self.data.paths, rank,
                                          world_size)
            head = (copy.deepcopy(self.frozen.head) if self.frozen.head is not None
                    else identity_head(self.frozen.feature_dim))
            self.net, trunk = None, nn.Identity()
        else:
            self.net = _trainable(start, cfg)
            trunk, head = self.net.backbone, self.net.head
            if cfg.teacher:
                teacher = resolve_source(settings, cfg.teacher, cfg.teacher_card, workdir)
                self.teacher = shared_features(teacher.embed, self.data.paths, rank,
                                               world_size)
        self.model = ray.train.torch.prepare_model(TrainNet(trunk, head, self.data.num_classes))
        self.device = next(self.model.parameters()).device
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=cfg.lr,
                                          weight_decay=cfg.weight_decay)
        total = cfg.epochs * len(self.sampler)
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _schedule(s, self.total_steps, cfg.warmup_steps)
        )
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, float]] = []

    def _param_groups(self) -> list[dict[str, Any]]:
        """Fresh layers (neck, classifier) learn ``head_lr_mult`` times faster than the
        pretrained backbone, which short runs on small data would otherwise overwrite. On
        frozen features everything trainable is the head, which starts at the identity."""
        core = self.core
        trunk = [p for p in core.trunk.parameters() if p.requires_grad]
        rest = [p for name, p in core.named_parameters()
                if p.requires_grad and not name.startswith("trunk.")]
        if not trunk:
            return [{"params": rest, "lr": self.cfg.lr}]
        return [{"params": trunk, "lr": self.cfg.lr},
                {"params": rest, "lr": self.cfg.lr * self.cfg.head_lr_mult}]

    @property
    def core(self) -> TrainNet:
        return cast(TrainNet, getattr(self.model, "module", self.model))  # DDP's, or itself

    # -- checkpoints -----------------------------------------------------------------------
    def restore(self) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state["history"])
        log.info("rank %d resumed at epoch %d, step %d", self.rank, self.epoch, self.step)
        return True

    def report(self, metrics: dict[str, float], final: bool) -> None:
        """Every rank reports (a barrier in Ray Train v2); only rank 0 writes files."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="embedder-ckpt-") as tmp:
            d = Path(tmp)
            if self.rank == 0:
                torch.save({
                    "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                    "step": self.step, "history": json.dumps(self.history),
                }, d / STATE_FILE)
                (d / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))
                if final:
                    metrics.update(self.finalise(d))
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)

    def finalise(self, directory: Path) -> dict[str, float]:
        """Rank 0: the serving embedder (classifier dropped), saved and evaluated as loaded
        back: ``embedder.pt``, or the ONNX graph + card + trained ``head.pt``."""
        from chatreid.embedder.load import load_embedder, write_onnx_checkpoint

        cfg = self.cfg
        if self.frozen is None:
            assert self.net is not None  # trained whenever nothing is frozen
            net = copy.deepcopy(self.net)  # Embedder puts it in eval mode; training goes on
            Embedder(net, model_id=model_id_for(net), height=cfg.height,
                     width=cfg.width).save(directory / CHECKPOINT_FILE)
        else:
            write_onnx_checkpoint(self.frozen.model_path, self.frozen.card, directory,
                                  head=copy.deepcopy(self.core.head).cpu().eval())
        embedder = load_embedder(directory, device=str(self.device),
                                 batch_size=cfg.eval_batch_size)
        t0 = time.perf_counter()
        scores = evaluate_parts(embedder, cfg.world_root, cfg.real_root)
        print(f"[embedder] {embedder.version}: rank-1 {scores['rank1']:.3f} "
              f"mAP {scores['mAP']:.3f} (eval {time.perf_counter() - t0:.1f} s)", flush=True)
        return {**scores, "embedder_dim": float(embedder.dim)}

    # -- training --------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        seed = np.random.SeedSequence([cfg.seed, self.epoch, self.rank]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))  # resumable: a function of the epoch
        # loss, ce, triplet, correct, samples, distill; on the device (NCCL sums across ranks)
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        t0 = time.perf_counter()
        for indices in self.sampler:
            if self.step >= self.total_steps:
                break
            x, labels, mirror = self._batch(indices, gen)
            x, labels = x.to(self.device), labels.to(self.device)
            feats, logits = self.model(x)
            ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            tri = triplet_hard_loss(feats, labels, cfg.triplet_margin)
            loss = ce + cfg.triplet_weight * tri
            if self.teacher is not None:
                target = _pick(self.teacher, indices, mirror).to(self.device)
                distill = relational_distill_loss(feats, target)
                loss = loss + cfg.distill_weight * distill
                sums[5] += distill.item() * len(labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            n = len(labels)
            correct = (logits.argmax(1) == labels).sum().item()
            sums += torch.tensor([loss.item() * n, ce.item() * n, tri.item() * n, correct, n, 0],
                                 dtype=torch.float64, device=self.device)
        wall = time.perf_counter() - t0
        sums = _all_reduce(sums)
        n = max(sums[4].item(), 1.0)
        return {"epoch": float(self.epoch), "step": float(self.step),
                "loss": sums[0].item() / n, "ce": sums[1].item() / n,
                "triplet": sums[2].item() / n, "train_acc": sums[3].item() / n,
                "distill": sums[5].item() / n,
                "samples": sums[4].item(), "wall_s": wall,
                "samples_per_s": sums[4].item() / max(wall, 1e-9)}

    def _batch(self, indices: list[int], gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, labels, mirrored): pixels flipped and pad-cropped, or, on a frozen graph,
        its features of the image or of the mirrored image."""
        n = len(indices)
        mirror = (torch.rand(n, generator=gen) < 0.5) if self.cfg.flip else torch.zeros(
            n, dtype=torch.bool)
        labels = torch.from_numpy(self.data.labels)[torch.as_tensor(indices)]
        if self.inputs is not None:
            return _pick(self.inputs, indices, mirror), labels, mirror
        images, _ = self.data.batch(indices)
        x = normalise(images)
        x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
        x = augment(x, pad=self.cfg.pad_px, flip=False, generator=gen)
        return x, labels, mirror

    def run(self) -> None:
        self.restore()
        if self.epoch >= self.cfg.epochs or self.step >= self.total_steps:
            self.report({"resumed_finished": 1.0}, final=True)  # nothing left: re-emit the result
            return
        while self.epoch < self.cfg.epochs:
            metrics = self.train_epoch()
            self.history.append(metrics)
            final = self.epoch + 1 >= self.cfg.epochs or self.step >= self.total_steps
            if self.rank == 0:
                print(f"[embedder] epoch {self.epoch + 1}/{self.cfg.epochs} step {self.step} "
                      f"loss {metrics['loss']:.4f} (ce {metrics['ce']:.4f}, triplet "
                      f"{metrics['triplet']:.4f}) acc {metrics['train_acc']:.3f} "
                      f"{metrics['samples_per_s']:.1f} samples/s", flush=True)
            self.epoch += 1
            self.report({**metrics, "first_loss": self.history[0]["loss"]}, final=final)
            if final:
                return


def _is_onnx(embedder) -> TypeGuard[OnnxEmbedder]:
    from chatreid.embedder.onnx import OnnxEmbedder

    return isinstance(embedder, OnnxEmbedder)


def _trainable(start, cfg: EmbedderTrainConfig) -> ReIDNet:
    """The torch network a run trains: ImageNet + a fresh BNNeck head, or a checkpoint's
    network (given a neck if it has none)."""
    if start is None:
        return imagenet_model(projection_dim=cfg.projection_dim, bnneck=True)
    net = copy.deepcopy(start.model).train()
    if net.head is None or net.head.bn is None:
        net.head = EmbeddingHead(net.backbone.out_dim, None, bnneck=True)
    return net


def _pick(pairs: torch.Tensor, indices: Sequence[int], mirror: torch.Tensor) -> torch.Tensor:
    """Rows of a (2, N, D) original/mirrored feature table, per sample."""
    idx = torch.as_tensor(list(indices))
    return torch.where(mirror.view(-1, 1), pairs[1][idx], pairs[0][idx])


def shared_features(fn, paths: Sequence[Path], rank: int, world_size: int,
                    chunk: int = 64) -> torch.Tensor:
    """(2, N, D) float32: ``fn`` on every image and on its mirror image. Each rank computes
    every ``world_size``-th image; the ranks then exchange their rows."""
    mine = list(range(rank, len(paths), world_size))
    rows: list[np.ndarray] = []
    for start in range(0, len(mine), chunk):
        images = [_read(paths[i]) for i in mine[start : start + chunk]]
        mirrored = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for img in images]
        rows.append(np.stack([fn(images), fn(mirrored)], axis=1))  # (n, 2, D)
        if rank == 0 and start // chunk % 20 == 0:
            print(f"[embedder] features {start + len(images)}/{len(mine)} (rank 0)", flush=True)
    own = (mine, np.concatenate(rows) if rows else np.zeros((0, 2, 1), np.float32))
    parts = _all_gather(own, world_size)
    dim = max(p[1].shape[-1] for p in parts)
    table = np.zeros((len(paths), 2, dim), np.float32)
    for idx, feats in parts:
        if len(idx):
            table[idx] = feats
    return torch.from_numpy(table).permute(1, 0, 2).contiguous()


def _all_gather(obj, world_size: int) -> list:
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def train_embedder_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop; ``config["embedder"]`` is an :class:`EmbedderTrainConfig`."""
    import ray.train

    from chatreid.cluster import unshare

    settings = unshare(config["settings"])  # what run_trainer passes workers
    if settings.train.torch_threads:
        torch.set_num_threads(settings.train.torch_threads)
    cfg = EmbedderTrainConfig.model_validate(config["embedder"])
    ctx = ray.train.get_context()
    EmbedderTrainer(cfg, ctx.get_world_rank(), ctx.get_world_size(), settings).run()
