"""The rerank side: which VLM serves (a verified checkpoint, or a base model while none exists),
loading it, a smoke query before it takes traffic, and the answers it gives.

A :class:`ModelSpec` is what the rerank deployment's ``user_config`` carries: rolling to a new
checkpoint is handing every replica a new spec. Loading a checkpoint pulls it from object
storage and verifies the manifest and every file's sha256 first (``checkpoints.pull``), so a
corrupted or incomplete checkpoint never reaches ``from_pretrained``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict

from chatreid.checkpoints import pull
from chatreid.config import ServeSettings, Settings
from chatreid.data.instructions import prompts as P
from chatreid.model import build_model
from chatreid.model.identity import IdentityVision
from chatreid.model.prompting import encode_prompt
from chatreid.model.vision_cache import ObjectStoreTier, VisionCache
from chatreid.rerank import BestChoiceReranker, Candidate, Query, QueryKind, RerankResult
from chatreid.storage import ObjectStore
from schemas import CheckpointEvent


class SmokeCheckFailed(RuntimeError):
    """A loaded model that does not answer the smoke query sensibly; it must not serve."""


class ModelSpec(BaseModel):
    """Which VLM a rerank replica serves: a pushed checkpoint, or a base model by name/dir."""

    model_config = ConfigDict(frozen=True)
    source: Literal["checkpoint", "base"]
    name: str  # base: "offline-default" / "tiny" / a directory; checkpoint: its version
    event: CheckpointEvent | None = None

    @classmethod
    def of_checkpoint(cls, event: CheckpointEvent) -> ModelSpec:
        return cls(source="checkpoint", name=event.version, event=event)

    @classmethod
    def of_base(cls, name: str) -> ModelSpec:
        return cls(source="base", name=name)

    @property
    def version(self) -> str:
        return self.name if self.source == "checkpoint" else f"base:{self.name}"


def resolve_spec(settings: Settings) -> ModelSpec | None:
    """The model to deploy now from ``serve.model``: "latest" is the newest checkpoint of
    ``serve.stage`` in object storage, else ``serve.fallback_model`` (None: no model); a base
    model name ("offline-default", "tiny") or a local model directory is that base; anything
    else is a checkpoint version in object storage (pinning one, e.g. to roll back)."""
    from chatreid.checkpoints import find, latest
    from chatreid.model.builder import OFFLINE_DEFAULT, TINY

    cfg = settings.serve
    if cfg.model in (OFFLINE_DEFAULT, TINY):
        return ModelSpec.of_base(cfg.model)
    if Path(cfg.model).is_dir():
        check_model_dir(Path(cfg.model))
        return ModelSpec.of_base(cfg.model)
    if cfg.model != "latest":
        event = find(settings, "vlm", cfg.model)
        if event is None:
            raise ValueError(f"serve.model {cfg.model!r}: not 'latest', a base model, a model "
                             "directory or a VLM checkpoint version in object storage")
        return ModelSpec.of_checkpoint(event)
    event = latest(settings, "vlm", cfg.stage)
    if event is not None:
        return ModelSpec.of_checkpoint(event)
    return ModelSpec.of_base(cfg.fallback_model) if cfg.fallback_model else None


def check_model_dir(path: Path) -> None:
    """Refuse a local directory that is not a complete VLM checkpoint, before anything rolls
    out to it: ``config.json`` of model type ``qwen2_vl``, tokenizer, image processor and
    weights; and when it carries a ``manifest.json`` (a pulled checkpoint), every file the
    manifest lists, with its size and sha256. Raises a ValueError naming the cause."""
    from chatreid.checkpoints import MANIFEST, CheckpointError
    from chatreid.model.builder import check_checkpoint_dir
    from chatreid.storage import file_sha256
    from schemas import CheckpointFile

    try:
        check_checkpoint_dir(path)  # names missing files and a wrong model type
    except (OSError, ValueError) as exc:  # ValueError: also a config.json that is not JSON
        raise CheckpointError(f"not a model checkpoint: {exc}") from None
    manifest = path / MANIFEST
    if not manifest.is_file():
        return
    try:
        files = [CheckpointFile.model_validate(f) for f in json.loads(manifest.read_text())
                 ["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest} is not a checkpoint manifest: {exc}") from None
    for f in files:
        local = path / f.path
        if not local.resolve().is_relative_to(path.resolve()):
            raise CheckpointError(f"{manifest} lists {f.path!r}, outside the checkpoint")
        if not local.is_file():
            raise CheckpointError(f"{path}: {f.path}, listed in {MANIFEST}, is missing")
        if local.stat().st_size != f.size or file_sha256(local) != f.sha256:
            raise CheckpointError(f"{path}: {f.path} does not match its manifest (size or "
                                  "sha256)")


@dataclass(frozen=True)
class RerankAnswer:
    result: RerankResult
    rationales: dict[str, str]  # candidate id -> the model's short explanation
    model_version: str


class VLMRuntime:
    """One loaded VLM with its reranker; immutable once built (a redeploy builds a new one)."""

    def __init__(self, model, processor, spec: ModelSpec, cfg: ServeSettings,
                 identity: IdentityVision | None = None,
                 vision_cache: VisionCache | None = None) -> None:
        self.model, self.processor, self.spec, self.cfg = model.eval(), processor, spec, cfg
        self.identity = identity  # the checkpoint's identity head (None: the paper's VLM alone)
        self.vision_cache = vision_cache  # this model's gallery crops through the ViT, by key
        self.reranker = BestChoiceReranker(model, processor, group_size=cfg.group_size,
                                           max_turns=cfg.max_turns, reuse_prefix=cfg.reuse_prefix,
                                           identity=identity, vision_cache=vision_cache)

    @property
    def version(self) -> str:
        return self.spec.version

    @classmethod
    def load(cls, settings: Settings, spec: ModelSpec,
             objects: ObjectStore | None = None) -> VLMRuntime:
        """Build the model ``spec`` names; a checkpoint is pulled and verified first
        (``CheckpointError`` on any mismatch). With ``serve.vision_cache_entries``, it gets a
        vision cache of its own encoder; ``objects`` (and ``serve.vision_cache_store``) shares
        that cache through object storage."""
        if spec.source == "base":
            if Path(spec.name).is_dir():  # a spec may arrive without resolve_spec's check
                check_model_dir(Path(spec.name))
            model, processor = build_model(spec.name)
            identity = IdentityVision.load(Path(spec.name)) if Path(spec.name).is_dir() else None
        else:
            assert spec.event is not None
            with tempfile.TemporaryDirectory(prefix="chatreid-vlm-") as tmp:
                pull(settings, spec.event, Path(tmp))
                model, processor = build_model(tmp)
                identity = IdentityVision.load(Path(tmp))
        if settings.serve.rerank_num_gpus and torch.cuda.is_available():
            # Ray set CUDA_VISIBLE_DEVICES to ours (transformers' .to() overloads hide this form)
            model = model.to("cuda", torch.bfloat16)  # pyright: ignore[reportArgumentType]
        return cls(model, processor, spec, settings.serve, identity,
                   vision_cache(settings.serve, model, processor, objects))

    # -- answers ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, query: Query, candidates: Sequence[Candidate], *, rationale: bool = False,
               max_turns: int | None = None) -> RerankAnswer:
        result = self.reranker.rerank(query, candidates, max_turns=max_turns)
        notes: dict[str, str] = {}
        if rationale and self.cfg.rationale_top:
            images = {c.id: c.image for c in candidates}
            for r in result.ranking[: self.cfg.rationale_top]:
                notes[r.candidate_id] = self.rationale(query, images[r.candidate_id])
        return RerankAnswer(result, notes, self.version)

    def rationale(self, query: Query, image: Image.Image) -> str:
        """Stage 2's attribute commonality/uniqueness between the query and a result; for a
        query without an image, the stage-1 description of the result."""
        if query.image is not None:
            return self._generate(P.ATTR_COMMON_UNIQUE_PROMPT, [query.image, image])
        return self._generate(P.CAPTION_PROMPT, [image])

    @torch.inference_mode()
    def _generate(self, prompt: str, images: list[Image.Image]) -> str:
        inputs = encode_prompt(self.processor, prompt, [im.convert("RGB") for im in images])
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.cfg.rationale_tokens,
                                  do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    # -- smoke query -----------------------------------------------------------------------------
    def smoke(self) -> None:
        """One image and one text query over three synthetic crops: each turn must name a
        shown candidate with a finite probability, and the ranking must hold all three."""
        crops = [Candidate(f"smoke-{i}", _figure(c)) for i, c in enumerate(_SMOKE_COLOURS)]
        queries = [Query(QueryKind.STANDARD, image=_figure(_SMOKE_COLOURS[0])),
                   Query(QueryKind.ATTRIBUTE, text="upper body: red")]
        for query in queries:
            try:
                result = self.reranker.rerank(query, crops, reuse_prefix=self.cfg.reuse_prefix)
            except Exception as exc:
                raise SmokeCheckFailed(f"{self.version}: smoke query failed: {exc}") from exc
            probs = [t.probability for t in result.turns]
            if (len(result.ranking) != len(crops) or not np.all(np.isfinite(probs))
                    or any(not 0.0 < p <= 1.0 for p in probs)):
                raise SmokeCheckFailed(f"{self.version}: smoke query gave turn probabilities "
                                       f"{probs} over {len(result.ranking)} results")


def vision_cache(cfg: ServeSettings, model, processor,
                 objects: ObjectStore | None) -> VisionCache | None:
    """The replica's cache of gallery crops' ViT outputs for this model's encoder (None when
    off: ``vision_cache_entries`` 0, or the plain path, which never uses it)."""
    if not cfg.vision_cache_entries or not cfg.reuse_prefix:
        return None
    tier = ObjectStoreTier(objects) if cfg.vision_cache_store and objects is not None else None
    return VisionCache(model, image_processor=processor.image_processor,
                       capacity=cfg.vision_cache_entries, tier=tier)


_SMOKE_COLOURS = ((200, 40, 40), (40, 60, 200), (40, 160, 60))


def _figure(colour: tuple[int, int, int]) -> Image.Image:
    """A person-shaped blob: top in ``colour``, dark trousers, on grey."""
    img = Image.new("RGB", (64, 128), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.ellipse((24, 6, 40, 24), fill=(220, 180, 150))
    d.rectangle((18, 26, 46, 70), fill=colour)
    d.rectangle((20, 70, 44, 122), fill=(30, 30, 40))
    return img
