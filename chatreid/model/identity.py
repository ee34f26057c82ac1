"""Re-ID-grade vision for the VLM: an identity head over a Re-ID backbone's features.

Why it exists. The paper's VLM inherits a ViT pretrained on billions of image-text pairs; ours
(offline) has a freshly initialised one that ~1k CPU samples cannot teach to tell people apart,
and the 135M decoder does not learn, within a CPU budget, to compare candidates through its own
attention (measured: best-choice accuracy stays at chance after 800 stage-3 samples, whether the
visual tokens are raw backbone features, query-relation tokens or slot-tagged tokens). What the
field already knows about people lives in Re-ID backbones, so the VLM gets one:

* **backbone**: any embedder the project loads (``chatreid.embedder.load_embedder``: the trained
  prefilter embedder, an imported ONNX Re-ID model, ImageNet MobileNetV2), copied into the
  checkpoint (``identity/backbone/``) so a checkpoint is self-contained;
* **identity head**: for a query image q and each candidate c shown in a best-choice turn, a
  relation score ``s(q, c, kind) = scale * sum_d w[kind, d] q_d c_d`` (optionally + an MLP residual)
  on L2-normalised features: a per-task metric (cloth-changing and visible-infrared learn which
  dimensions survive a change of clothes or of modality) starting exactly at ``scale * cos``;
* **pointer term**: the turn's answer distribution is ``softmax(decoder index logits + s)``
  over the candidates shown — the decoder's own logits, shifted by what the identity head sees;
* **trait term**: an image query of a kind with a fitted weight also adds
  ``traits[kind] * t(q, c)``, the agreement of the two crops' persistent body traits (skin tone,
  hair, build...: ``chatreid.model.traits``, a reader trained on the train people's stage-1
  attribute labels) - what survives a change of clothes, where the backbone reads the clothes;
* **clue term**: a query with a text clue (text-to-image, attribute, multimodal) also adds
  ``clue[kind] * m(t, c)``, the colour-attribute match between the clue and the candidate
  (``chatreid.embedder.colour``: the share of the candidate's torso/leg pixels in the colours the
  clue names, in [0, 1] like a cosine), its weight fitted on held-out people per kind — the
  VLM's reading of the clue, where the 135M decoder alone answers text queries at chance.

The decoder stays a ``Qwen2VLForConditionalGeneration`` with its processor and chat template;
the head is an optional ``identity/`` folder beside the weights. A hub Qwen2-VL checkpoint has
none and runs exactly the paper's way (pointer term 0); a text-only query gets only the clue
term (none from heads saved before it).

The head trains on cached backbone features (:class:`FeatureCache`): the backbone is frozen, so
each crop's features are computed once per backbone version, and a cache written for another
version is refused rather than mixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from chatreid.embedder.colour import ColourAttributeMatcher
from schemas.api import QueryKind

if TYPE_CHECKING:  # the reader loads only with a head that has one
    from chatreid.model.traits import TraitReader

IDENTITY_DIR = "identity"
CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"
TRAITS_DIR = "traits"  # the trait reader (chatreid.model.traits), when the head has one
# Image-query kinds the head scores (text-only kinds have no query image to relate to).
IMAGE_KINDS = ("standard", "cloth_changing", "visible_infrared", "multimodal")
INITIAL_SCALE = 10.0  # s = 10 cos at start: a 0.1 cosine gap is one logit
# Kinds whose query carries a text clue: the clue term's kinds.
CLUE_KINDS = tuple(k.value for k in QueryKind if k.has_text)
# The metric that relates two candidates to each other (dialogue memory) when the query has no
# image: "is this the same person in another view", the standard task's question.
BETWEEN_KIND = "standard"


def _kind_name(kind: str) -> str:
    """Today's name of a query kind: stage-3 samples and heads saved before the rename say
    "adaptive" for "multimodal"."""
    try:
        return QueryKind.parse(kind).value
    except ValueError:  # not a query kind at all: the lookup reports it
        return kind


class IdentityError(ValueError):
    """An identity head that does not fit its backbone, its cache or its input."""


@dataclass
class IdentityConfig:
    """What ``identity/config.json`` records."""

    feature_dim: int
    encoder_version: str  # the backbone's embedding-space version: features are only comparable
    # (and a feature cache only reusable) under the same version
    kinds: list[str] = field(default_factory=lambda: list(IMAGE_KINDS))
    hidden: int = 0  # width of the MLP residual; 0 = none (on ~1k groups an MLP memorises the
    # training identities: cuhk03 held-out rank-1 35.7 with 256 vs 38.7 without, cosine 34.3)
    metrics: dict[str, float] = field(default_factory=dict)  # training/validation figures
    memory: float = 0.0  # dialogue memory: weight of the earlier picks in each turn's pointer
    # term (``IdentityVision.relations``); fitted on held-out people, 0 = off (heads before it)
    decoder_weight: float = 1.0  # how far a turn trusts the decoder's index logits beside the
    # head: answer = softmax(decoder_weight * logits + s); fitted on groups the decoder never
    # trained on (1 = plain sum, as heads saved before it)
    clue: dict[str, float] = field(default_factory=dict)  # per query kind with a text clue, the
    # weight of the clue's colour-attribute match in the pointer term; fitted on held-out people;
    # a kind absent gets no clue term (heads before it)
    kind_memory: dict[str, float] = field(default_factory=dict)  # a kind's own memory weight
    # where it was fitted apart from ``memory`` (the clue kinds: an earlier pick says less about
    # a person described by two colours than about a photographed one)
    abstain: list[str] = field(default_factory=list)  # kinds whose dialogue did not surely beat
    # the prefilter's order on held-out people: answered in the prefilter's order, not reranked
    traits: dict[str, float] = field(default_factory=dict)  # per image kind, the weight of the
    # trait agreement t(q, c) in the pointer term; fitted on held-out people; a kind absent (or
    # a head saved without a trait reader) gets no trait term

    def __post_init__(self) -> None:
        # heads saved before the rename list "adaptive": read it as today's name
        self.kinds = [_kind_name(k) for k in self.kinds]
        self.clue = {_kind_name(k): float(v) for k, v in self.clue.items()}
        self.kind_memory = {_kind_name(k): float(v) for k, v in self.kind_memory.items()}
        self.abstain = [_kind_name(k) for k in self.abstain]
        self.traits = {_kind_name(k): float(v) for k, v in self.traits.items()}

    def memory_of(self, kind: str) -> float:
        """The dialogue-memory weight a query of ``kind`` runs with."""
        return self.kind_memory.get(_kind_name(kind), self.memory)


class IdentityHead(nn.Module):
    """Relation scores between a query feature and candidate features, per query kind."""

    def __init__(self, cfg: IdentityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, k = cfg.feature_dim, len(cfg.kinds)
        self.metric = nn.Parameter(torch.ones(k, d))
        # log-space: the scale can grow by orders of magnitude (over a noisy decoder) in a
        # few hundred Adam steps
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(INITIAL_SCALE))))
        self.mlp = None
        if cfg.hidden:
            self.mlp = nn.Sequential(nn.Linear(2 * d + k, cfg.hidden), nn.GELU(),
                                     nn.Linear(cfg.hidden, 1))
            # the residual starts at 0: s = scale * cos (mlp[2] is the Linear: Tensors, not Modules)
            nn.init.zeros_(self.mlp[2].weight)  # pyright: ignore[reportArgumentType]
            nn.init.zeros_(self.mlp[2].bias)  # pyright: ignore[reportArgumentType]

    @torch.no_grad()
    def make_plain(self, kind: str) -> None:
        """Score ``kind`` with the plain cosine the head starts from (``INITIAL_SCALE`` times
        it, whatever the trained scale): where its learned metric did worse on held-out
        people than the cosine it started from (``chatreid.tuning.identity.fit_kinds``)."""
        self.metric[self.kind_index(kind)] = INITIAL_SCALE / float(self.log_scale.exp())

    def kind_index(self, kind: str) -> int:
        try:
            return self.cfg.kinds.index(_kind_name(kind))
        except ValueError:
            raise IdentityError(f"the identity head scores {self.cfg.kinds}, not {kind!r}") \
                from None

    def forward(self, q: torch.Tensor, c: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """``q`` (B, d), ``c`` (B, n, d), ``kind`` (B,) indices → scores (B, n)."""
        q = nn.functional.normalize(q, dim=-1)[:, None, :].expand_as(c)
        c = nn.functional.normalize(c, dim=-1)
        w = self.metric[kind][:, None, :]
        linear = self.log_scale.exp() * (w * q * c).sum(-1)
        if self.mlp is None:
            return linear
        onehot = nn.functional.one_hot(kind, len(self.cfg.kinds)).float()
        root = c.shape[-1] ** 0.5  # unit vectors' entries are ~1/sqrt(d): bring them to ~1
        rel = torch.cat([q * c * root, (q - c).abs() * root,
                         onehot[:, None, :].expand(*c.shape[:2], -1)], dim=-1)
        return linear + self.mlp(rel)[..., 0]


    @torch.no_grad()
    def score(self, query: torch.Tensor, candidates: torch.Tensor, kind: str) -> np.ndarray:
        """s(q, c) for every candidate from features: ``query`` (d,), ``candidates`` (n, d)."""
        kind_t = torch.tensor([self.kind_index(kind)])
        return self(query[None], candidates[None], kind_t)[0].double().numpy()

    def relations(self, query: torch.Tensor, candidates: torch.Tensor, kind: str
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(s(q, c) for every candidate, s(c_i, c_j) between candidates) - what a dialogue with
        memory needs (``memory_pointer``)."""
        return self.score(query, candidates, kind), self.between(candidates, kind)

    @torch.no_grad()
    def between(self, candidates: torch.Tensor, kind: str) -> np.ndarray:
        """s(c_i, c_j) between candidates (n, d) under ``kind``'s metric."""
        n, kind_t = len(candidates), torch.tensor([self.kind_index(kind)])
        return self(candidates, candidates[None].expand(n, -1, -1),
                    kind_t.expand(n)).double().numpy()


class IdentityVision:
    """A backbone and its identity head: what a best-choice turn adds to the decoder's logits."""

    def __init__(self, backbone, head: IdentityHead, traits: TraitReader | None = None) -> None:
        if backbone.version != head.cfg.encoder_version:
            raise IdentityError(
                f"identity head trained on backbone {head.cfg.encoder_version}, "
                f"given {backbone.version}")
        self.backbone, self.head, self.traits = backbone, head.eval(), traits

    def trait_weight(self, kind: str) -> float:
        """The trait term's weight for ``kind`` (0: none, or no reader)."""
        return self.head.cfg.traits.get(_kind_name(kind), 0.0) if self.traits else 0.0

    @property
    def version(self) -> str:
        return self.head.cfg.encoder_version

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.asarray(self.backbone.embed([im.convert("RGB") for im in images]), np.float32)

    @property
    def decoder_weight(self) -> float:
        return self.head.cfg.decoder_weight

    def applies_to(self, kind: str) -> bool:
        """Whether a query of ``kind`` gets a pointer term (an image term or a clue term)."""
        kind = _kind_name(kind)
        return kind in self.head.cfg.kinds or self.head.cfg.clue.get(kind, 0.0) > 0

    def memory_of(self, kind: str) -> float:
        return self.head.cfg.memory_of(kind)

    def abstains(self, kind: str) -> bool:
        """Whether queries of ``kind`` keep the prefilter's order (``IdentityConfig.abstain``)."""
        return _kind_name(kind) in self.head.cfg.abstain

    def pointer_terms(self, kind: str, image: Image.Image | None, text: str | None,
                      candidates: Sequence[Image.Image]
                      ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A query's pointer term over ``candidates`` and, when its kind runs with dialogue
        memory, the scores between candidates; None when the head adds nothing to it (a kind it
        does not score, a text-only query without a fitted clue weight).

        The term is ``s(q, c)`` for an image query of a kind the head scores, plus
        ``clue[kind] * m(text, c)`` for a clue (module doc)."""
        kind = _kind_name(kind)
        weight = self.head.cfg.clue.get(kind, 0.0) if text else 0.0
        sees_image = image is not None and kind in self.head.cfg.kinds
        if not sees_image and not weight:
            return None
        memory = self.memory_of(kind) > 0
        cands = None
        to_query = np.zeros(len(candidates))
        if sees_image:
            feats = torch.from_numpy(self.features([image, *candidates]))  # pyright: ignore[reportArgumentType]  (checked above)
            cands, to_query = feats[1:], self.head.score(feats[0], feats[1:], kind)
            if self.traits is not None and (trait := self.trait_weight(kind)):
                read = self.traits.read([image, *candidates])  # pyright: ignore[reportArgumentType]  (checked above)
                to_query = to_query + trait * self.traits.match(read[:1], read[1:])[0]
        elif memory:
            cands = torch.from_numpy(self.features(candidates))
        if weight:
            to_query = to_query + weight * clue_match(text or "", candidates)
        # the scores between candidates only where a pick changes later turns
        between = None if not memory or cands is None else self.head.between(
            cands, kind if sees_image else BETWEEN_KIND)
        return to_query, between

    def scores(self, query: Image.Image, candidates: Sequence[Image.Image], kind: str
               ) -> np.ndarray:
        """s(q, c) for every candidate (the pointer term of each turn that shows c)."""
        feats = torch.from_numpy(self.features([query, *candidates]))
        return self.head.score(feats[0], feats[1:], kind)

    # -- files -----------------------------------------------------------------------------------
    def save(self, model_dir: Path) -> Path:
        from chatreid.embedder.load import write_embedder

        out = Path(model_dir) / IDENTITY_DIR
        write_embedder(self.backbone, out / BACKBONE_DIR)
        save_identity_head(self.head, out)
        if self.traits is not None:
            self.traits.save(out / TRAITS_DIR)
        return out

    @classmethod
    def load(cls, model_dir: Path, *, device: str = "cpu") -> IdentityVision | None:
        """The head saved beside a checkpoint's weights; None when it has none (hub models)."""
        from chatreid.embedder.load import load_embedder

        folder = Path(model_dir) / IDENTITY_DIR
        if not folder.is_dir():
            return None
        head = load_identity_head(folder)
        traits = None
        if (folder / TRAITS_DIR).is_dir():
            from chatreid.model.traits import TraitReader

            traits = TraitReader.load(folder / TRAITS_DIR)
        return cls(load_embedder(folder / BACKBONE_DIR, device=device), head, traits)


_MATCHER = ColourAttributeMatcher()


def clue_match(clue: str, candidates: Sequence[Image.Image]) -> np.ndarray:
    """m(t, c) in [0, 1] for every candidate: the share of its pixels in the garment colours the
    clue names (0 everywhere when it names none) - the text prefilter's own score."""
    return _MATCHER.match(_MATCHER.embed_texts([clue]),
                          _MATCHER.embed_images(candidates))[0].astype(np.float64)


def memory_pointer(to_query: np.ndarray, between: np.ndarray | None, memory: float,
                   picks: Sequence[tuple[int, float]]) -> np.ndarray:
    """A turn's pointer term with dialogue memory: ``s(q, c) + memory * sum_p pi_p s(p, c) /
    sum_p pi_p`` over the earlier picks ``p`` and the probability ``pi_p`` their turn gave them
    (a sure pick weighs more than a guess). Query expansion inside the dialogue: a second view
    of the person found in turn 1 helps find a third one in turn 2."""
    if between is None or not memory or not picks:
        return to_query
    weights = np.array([w for _, w in picks], np.float64)
    if weights.sum() <= 0:
        return to_query
    rows = between[[i for i, _ in picks]]
    return to_query + memory * (weights @ rows) / weights.sum()


def save_identity_head(head: IdentityHead, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(head.cfg), indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(folder / HEAD_FILE))


def load_identity_head(folder: Path) -> IdentityHead:
    missing = [f for f in (CONFIG_FILE, HEAD_FILE) if not (folder / f).is_file()]
    if missing:
        raise IdentityError(f"{folder} lacks {', '.join(missing)}")
    head = IdentityHead(IdentityConfig(**json.loads((folder / CONFIG_FILE).read_text())))
    head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return head.eval()


# --- cached features ---------------------------------------------------------------------------


class FeatureCache:
    """Backbone features of crops, computed once per backbone version and kept on disk.

    One ``.npz`` per version under ``root``; it records the version it was written for, and
    opening it for any other version raises :class:`IdentityError` (never silently mixed).
    """

    def __init__(self, root: Path, version: str) -> None:
        self.version = version
        safe = re.sub(r"[^A-Za-z0-9._@-]", "_", version)
        self.path = Path(root) / f"{safe}.npz"
        self._feats: dict[str, np.ndarray] = {}
        self.computed = 0
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        with np.load(self.path, allow_pickle=False) as data:
            written_for = str(data["version"])
            if written_for != self.version:
                raise IdentityError(f"{self.path} holds features of backbone {written_for}, "
                                    f"not {self.version}: refusing to mix them")
            self._feats = dict(zip(data["keys"].tolist(), data["feats"], strict=True))

    def __len__(self) -> int:
        return len(self._feats)

    def get(self, keys: Sequence[str], load: Callable[[str], Image.Image], backbone,
            batch: int = 64) -> np.ndarray:
        """Features of ``keys`` (image paths/ids), computing and saving the missing ones."""
        if backbone.version != self.version:
            raise IdentityError(f"cache for backbone {self.version}, given {backbone.version}")
        todo = [k for k in dict.fromkeys(keys) if k not in self._feats]
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            feats = np.asarray(backbone.embed([load(k).convert("RGB") for k in chunk]), np.float32)
            self._feats.update(zip(chunk, feats, strict=True))
        if todo:
            self.computed += len(todo)
            self._write()
        return np.stack([self._feats[k] for k in keys])

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._feats)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, version=np.array(self.version), keys=np.array(keys),
                 feats=np.stack([self._feats[k] for k in keys]))
        tmp.replace(self.path)
