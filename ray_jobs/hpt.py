"""Hierarchical Progressive Tuning as Ray Train jobs: one job per stage, chained by checkpoints.

``run_stage`` trains one stage on the Ray cluster (see ``chatreid.tuning.hpt`` for the loop) and
pushes the result to object storage with a manifest and a ``checkpoints`` event; ``run_chain``
runs the stages in order, each starting from the previous one's pushed checkpoint. Skipping
stages gives the paper's Table 4 ablation: ``(3,)``, ``(2, 3)`` or ``(1, 2, 3)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import torch
from PIL import Image
from pydantic import BaseModel

from chatreid.checkpoints import MANIFEST, describe, pull, push
from chatreid.config import Settings, TrainSettings
from chatreid.data.build import iter_samples, shards_for_worker
from chatreid.data.instructions.samples import ImageEntry, load_entries
from chatreid.data.report import DatasetReport
from chatreid.data.worlds import ImageResolver
from chatreid.storage import ObjectNotFound
from chatreid.tuning.hpt import FINAL_DIR, HPTConfig, StageTrainer
from ray_jobs.launcher import run_trainer, settings_from
from schemas import CheckpointEvent
from schemas.events import CheckpointStage

if TYPE_CHECKING:  # heavy or only annotated here: imported where used
    from chatreid.model.traits import TraitReader
    from chatreid.synth import SynthConfig

log = logging.getLogger(__name__)

MODEL_NAME: Final = "vlm"
ABLATIONS: dict[str, tuple[int, ...]] = {"3": (3,), "2+3": (2, 3), "1+2+3": (1, 2, 3)}


class StageJob(BaseModel):
    """Everything a stage's workers need; the driver fills it, the loop reads it."""

    hpt: HPTConfig
    dataset_id: str
    num_shards: int
    world_id: str
    world_root: str | None = None  # local copy, when the workers share the driver's disk
    parent: CheckpointEvent | None = None
    eval_dataset_id: str | None = None  # stage-3 samples of held-out identities (rank 0 scores)
    identity_backbone: str | None = None  # stage 3: the identity head's backbone (None: none)
    trait_people: int | None = None  # stage 3: extra synthetic people the head's trait reader
    # also learns from (0: the training world's only; None: no trait reader)


class StageOutcome(BaseModel):
    stage: int
    version: str
    parent_version: str | None
    wall_s: float
    metrics: dict[str, float]
    event: CheckpointEvent


class Runtime(BaseModel):
    """How a stage trains (not what): part of the version, since resumable state differs."""

    workers: int
    gpu: bool
    deepspeed: bool
    zero_stage: int
    bf16: bool

    @classmethod
    def of(cls, train: TrainSettings) -> Runtime:
        gpu = train.use_gpu
        return cls(
            workers=train.num_workers, gpu=gpu,
            deepspeed=train.deepspeed if train.deepspeed is not None else gpu,
            zero_stage=train.zero_stage, bf16=train.bf16 if train.bf16 is not None else gpu,
        )


def version_for(job: StageJob, runtime: Runtime, identity: dict[str, Any] | None = None) -> str:
    """Same inputs → same version: a re-run resumes the same Ray run and re-pushes idempotently.
    ``identity``: what a stage-3 identity head is made from (:func:`identity_recipe`); the same
    decoder with a head over another embedder is another checkpoint."""
    parts: dict[str, Any] = {
        "hpt": job.hpt.model_dump(), "data": job.dataset_id,
        "parent": job.parent.version if job.parent else None, "runtime": runtime.model_dump(),
    }
    if identity is not None:
        parts["identity"] = identity
    key = json.dumps(parts, sort_keys=True)
    return f"hpt{job.hpt.stage}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def identity_recipe(settings: Settings, job: StageJob) -> dict[str, Any] | None:
    """The inputs of the identity head a stage-3 job attaches (None when it attaches none): the
    backbone's resolved version ('prefilter' names whichever embedder serves now) and the
    settings that train and fit the head."""
    if job.hpt.stage != 3 or not job.identity_backbone:
        return None
    t = settings.train
    recipe = {"backbone": identity_backbone(settings, job.identity_backbone).version,
              "epochs": t.identity_epochs, "fit_world": t.fit_world, "fit_queries": t.fit_queries}
    if job.trait_people is not None:  # a head with a trait reader is another checkpoint
        recipe["trait_people"] = job.trait_people
    return recipe


# --- worker side -------------------------------------------------------------------------------


def image_loader(settings: Settings, job: StageJob) -> Callable[[str], Image.Image]:
    """World-relative image paths → images (local copy, else fetched from object storage)."""
    resolver = world_resolver(settings, job)
    return lambda relpath: Image.open(resolver(relpath))


def world_resolver(settings: Settings, job: StageJob) -> ImageResolver:
    """The job's world files: the local copy, else fetched from object storage and cached."""
    return ImageResolver(
        settings, job.world_id,
        local_root=Path(job.world_root) if job.world_root else None,
        cache_dir=settings.train.out_dir / "cache" / "worlds",
    )


def world_entries(settings: Settings, job: StageJob) -> list[ImageEntry]:
    """The training world's annotated crops (train and val identities), from the local copy
    or object storage, as ``image_loader`` reads its images."""
    resolver = world_resolver(settings, job)
    resolver("attributes/identities.json")
    return load_entries(resolver("attributes/attributes.json").parent.parent)


def hpt_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (every worker): fetch data and parent, then train the stage."""
    import ray.train

    settings = settings_from(config)
    job = StageJob.model_validate(config["job"])
    train = settings.train
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    ctx = ray.train.get_context()
    shards = shards_for_worker(job.num_shards, ctx.get_world_rank(), ctx.get_world_size())
    samples = list(iter_samples(settings, job.dataset_id, job.hpt.stage, shards))
    eval_samples = []
    if job.eval_dataset_id and ctx.get_world_rank() == 0:
        eval_samples = list(iter_samples(settings, job.eval_dataset_id, 3))
    load = image_loader(settings, job)
    with tempfile.TemporaryDirectory(prefix="parent-") as tmp:
        parent_dir = None
        if job.parent is not None:
            pull(settings, job.parent, Path(tmp))  # verifies every file's sha256
            parent_dir = Path(tmp)
        runtime = Runtime.of(train)
        trainer = StageTrainer(
            job.hpt, samples, eval_samples, load, parent_dir,
            deepspeed=runtime.deepspeed, zero_stage=runtime.zero_stage, bf16=runtime.bf16,
            checkpoint_every=train.checkpoint_every,
        )
    trainer.run()


# --- driver side -------------------------------------------------------------------------------


def run_stage(settings: Settings, job: StageJob) -> StageOutcome:
    """Train one stage on the cluster, then push its model with a manifest and an event."""
    runtime = Runtime.of(settings.train)
    version = version_for(job, runtime, identity_recipe(settings, job))
    t0 = time.perf_counter()
    result = run_trainer(
        settings, hpt_loop, {"job": job.model_dump(mode="json")}, name=f"{MODEL_NAME}-{version}"
    )
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"stage {job.hpt.stage} ended without a checkpoint: {result.error}")
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
        final = Path(result.checkpoint.to_directory(tmp)) / FINAL_DIR
        if not final.is_dir():
            raise RuntimeError(f"stage {job.hpt.stage}: last checkpoint holds no {FINAL_DIR}/")
        if job.hpt.stage == 3 and job.identity_backbone:
            metrics |= attach_identity(settings, job, final)
        if f"stage{job.hpt.stage}" == settings.serve.stage:  # the stage a rollout serves
            metrics |= _gate_figures(settings, final)
        event = push(
            settings, final, model=MODEL_NAME, version=version,
            stage=cast(CheckpointStage, f"stage{job.hpt.stage}"),  # HPTConfig: stage 1..3
            parent_version=job.parent.version if job.parent else None,
            data_hash=job.dataset_id, metrics=metrics,
            config={**job.hpt.model_dump(), "runtime": runtime.model_dump()},
        )
    return StageOutcome(stage=job.hpt.stage, version=version, wall_s=wall, metrics=metrics,
                        parent_version=event.parent_version, event=event)


def refit_identity(settings: Settings, version: str, trait_people: int | None = None
                   ) -> StageOutcome:
    """Train and fit the identity head of stage-3 checkpoint ``version`` again on its own
    stage-3 data - for the embedder ``train.vision_backbone`` names now (a rolled-out
    prefilter) or under newer fit rules - and push the result as a new stage-3 version whose
    parent is ``version``. The decoder is not tuned again: its files are carried over as
    they are, so this takes minutes, not a chain."""
    from chatreid.checkpoints import find
    from chatreid.data.build import load_manifest
    from chatreid.model.identity import IDENTITY_DIR

    source = find(settings, MODEL_NAME, version)
    if source is None or source.stage != "stage3":
        raise ValueError(f"no complete stage-3 checkpoint {version!r} in object storage "
                         "(`chatreid checkpoints` lists them)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refit-") as tmp:
        model_dir = Path(tmp) / "model"
        manifest = pull(settings, source, model_dir)
        data = load_manifest(settings, manifest["data_hash"], 3)
        config = {k: v for k, v in manifest["config"].items() if k != "runtime"}
        job = StageJob(hpt=HPTConfig.model_validate(config), dataset_id=data.dataset_id,
                       num_shards=len(data.shards), world_id=data.world_id,
                       eval_dataset_id=_eval_dataset(settings, data.world_id),
                       identity_backbone=settings.train.vision_backbone,
                       trait_people=trait_people)
        shutil.rmtree(model_dir / IDENTITY_DIR, ignore_errors=True)
        (model_dir / MANIFEST).unlink()  # it lists the old head's files; push writes the new
        metrics = {k: v for k, v in manifest["metrics"].items()
                   if not k.startswith(("identity/", "eval_with_identity/", "gate/"))}
        metrics |= attach_identity(settings, job, model_dir)
        if settings.serve.stage == "stage3":
            metrics |= _gate_figures(settings, model_dir)
        digest = hashlib.sha256(json.dumps(
            [version, [f.model_dump() for f in describe(model_dir / IDENTITY_DIR)]],
            sort_keys=True).encode()).hexdigest()[:10]
        event = push(settings, model_dir, model=MODEL_NAME, version=f"hpt3-{digest}",
                     stage="stage3", parent_version=version, data_hash=data.dataset_id,
                     metrics=metrics, config={**manifest["config"], "identity_refit_of": version})
    return StageOutcome(stage=3, version=event.version, wall_s=time.perf_counter() - t0,
                        metrics=metrics, parent_version=version, event=event)


def _eval_dataset(settings: Settings, world_id: str) -> str | None:
    """The held-out (test identities) stage-3 dataset built from ``world_id``, if one is
    stored: what the chain scored the checkpoint on."""
    from chatreid.data.build import DatasetError, load_manifest
    from chatreid.storage import ObjectStore

    ids = sorted({key.split("/")[1] for key in ObjectStore(settings.s3).list("instructions/")})
    for dataset_id in ids:
        try:
            m = load_manifest(settings, dataset_id, 3)
        except DatasetError:
            continue
        if m.world_id == world_id and tuple(m.spec.splits) == ("test",):
            return dataset_id
    return None


def identity_backbone(settings: Settings, source: str):
    """The embedder ``source`` names: 'prefilter' is the one serving the prefilter now."""
    from chatreid.embedder.load import resolve_embedder
    from chatreid.evaluation.gate import serving_embedder

    return serving_embedder(settings) if source == "prefilter" \
        else resolve_embedder(settings, source)


def world_recipe(settings: Settings, job: StageJob, what: str) -> SynthConfig | None:
    """The recipe the job's training world was made from (its ``manifest.json``); None, logged
    as ``what`` going without, when it carries none (a world not made by ``chatreid synth``)."""
    from chatreid.synth import SynthConfig

    try:
        recipe = json.loads(world_resolver(settings, job)("manifest.json").read_text())["config"]
    except (FileNotFoundError, ObjectNotFound, KeyError) as exc:
        log.warning("no %s: the training world has no recipe (%s)", what, exc)
        return None
    return SynthConfig.model_validate(recipe)


def fit_world_of(settings: Settings, job: StageJob) -> Path | None:
    """The fit world of the job's training world (``chatreid.tuning.identity.fit_world``),
    generated once into the training cache; None when ``train.fit_world`` is off or the
    training world carries no recipe (then the fit judges on held-out people of the training
    world)."""
    from chatreid.tuning.identity import fit_world

    recipe = world_recipe(settings, job, "fit world") if settings.train.fit_world else None
    return None if recipe is None else \
        fit_world(settings.train.out_dir / "cache" / "worlds", recipe)


def trait_world_of(settings: Settings, job: StageJob, people: int) -> Path | None:
    """A world of ``people`` more people for the trait reader (the training world's recipe,
    the embedder's extra-people seed: ``extra_world_config``), generated once into the training
    cache; None where the training world carries no recipe."""
    from chatreid.tuning.embedder_training import extra_world_config
    from chatreid.tuning.identity import cached_world

    recipe = world_recipe(settings, job, "extra people for the trait reader")
    return None if recipe is None else cached_world(
        settings.train.out_dir / "cache" / "worlds", extra_world_config(recipe, people), "people")


def train_traits(settings: Settings, job: StageJob, entries: list[ImageEntry], held_out: set[str],
                 load: Callable[[str], Image.Image]
                 ) -> tuple[TraitReader | None, dict[str, float]]:
    """The identity head's trait reader, trained on the stage-1 attribute labels of the
    training world's ``entries`` but ``held_out`` people (the per-kind fit judges on them) and of
    ``job.trait_people`` more people; its figures. None where no labelled crop is left."""
    from chatreid.model.traits import labelled_crops, train_trait_reader
    from chatreid.tuning.identity import FIT_SPLITS

    t0 = time.perf_counter()
    crops = labelled_crops(e for e in entries if str(e.pid) not in held_out)
    root = trait_world_of(settings, job, job.trait_people) if job.trait_people else None
    if root is not None:
        # keyed by absolute path: the loader opens those itself, the rest from the world
        crops += labelled_crops(load_entries(root.resolve(), FIT_SPLITS), absolute=True)
    if not crops:
        log.warning("no trait reader: no crop of a person outside the held-out ones")
        return None, {}
    reader = train_trait_reader(
        crops, lambda key: Image.open(key) if Path(key).is_absolute() else load(key),
        progress=lambda epoch, loss: log.info("trait reader: epoch %d, loss %.3f", epoch + 1,
                                              loss))
    return reader, {"traits/crops": float(len(crops)),
                    "traits/seconds": round(time.perf_counter() - t0, 1)}


def attach_identity(settings: Settings, job: StageJob, model_dir: Path) -> dict[str, float]:
    """Train the identity head on the stage's groups (cached backbone features; the epoch is
    chosen on held-out people of the training split) and save it beside the model. Returns its
    figures, and the decoder + head's held-out best-choice accuracy (as served) per task."""
    from chatreid.embedder.colour import ColourAttributeMatcher
    from chatreid.evaluation import EvalConfig
    from chatreid.model import build_model
    from chatreid.model.identity import FeatureCache, IdentityVision
    from chatreid.model.prompting import choice_tokens
    from chatreid.tuning.evaluate import choice_probabilities, evaluate_best_choice
    from chatreid.tuning.identity import (
        FIT_SPLITS,
        FIT_WORLD,
        TRAINING_WORLD,
        HeadRecipe,
        fit_decoder_weight,
        fit_kinds,
        fit_memory,
        fit_world_clue_samples,
        group_features,
        groups_of,
        held_out_clue_shortlists,
        sample_index,
        split_by_person,
        train_identity_head,
        with_decoder,
        world_shortlists,
    )
    from chatreid.tuning.stages import rule_for

    assert job.identity_backbone is not None
    backbone = identity_backbone(settings, job.identity_backbone)
    load = image_loader(settings, job)
    cache = FeatureCache(settings.train.out_dir / "cache" / "features", backbone.version)
    samples = list(iter_samples(settings, job.dataset_id, 3))
    model, processor = build_model(str(model_dir))
    tokens, rule = choice_tokens(processor.tokenizer, 8), rule_for(3)

    def decoder(sample):
        return choice_probabilities(model, processor, sample, load, rule, tokens)

    groups = with_decoder(groups_of(samples), sample_index(samples), decoder)
    train_groups, val_groups = split_by_person(groups, seed=job.hpt.seed)
    head = train_identity_head(
        train_groups, group_features(train_groups, cache, backbone, load),
        val_groups, group_features(val_groups, cache, backbone, load), backbone.version,
        HeadRecipe(epochs=settings.train.identity_epochs, seed=job.hpt.seed))
    # how far to trust the decoder beside the head, then the dialogue memory's weight, then the
    # clue term's: all fitted on the same held-out people (their groups; their shortlists)
    head.cfg.decoder_weight, weight_figures = fit_decoder_weight(
        head, val_groups, group_features(val_groups, cache, backbone, load))
    head.cfg.metrics |= weight_figures
    # the per-kind settings are chosen on, and must surely gain in, both regimes a site's
    # queries lie between: the head's held-out people of the training world (the prefilter's
    # own training people) and, where the world's recipe allows, its fit world (new people and
    # cameras: nobody trained on them)
    matcher = ColourAttributeMatcher()
    held_out = {str(g.pid) for g in val_groups}
    training = world_entries(settings, job)  # read once: the reader and the fit both use it
    traits = None
    if job.trait_people is not None:
        traits, trait_figures = train_traits(settings, job, training, held_out, load)
        head.cfg.metrics |= trait_figures

    def lists_of(source: str, entries: list[ImageEntry], people: set[str],
                 clue_samples: list, loader: Callable[[str], Image.Image], store: FeatureCache):
        def features(keys: list[str]):
            return store.get(keys, loader, backbone)

        # in the order the site serves image queries' shortlists (serve.shortlist_order)
        image = world_shortlists(entries, people, features, max_queries=settings.train.fit_queries,
                                 served=EvalConfig.served(settings.serve),
                                 traits=None if traits is None else (traits, loader))
        clue = held_out_clue_shortlists(
            clue_samples, entries, people, features,
            lambda keys: matcher.embed_images([loader(k) for k in keys]))
        return [dataclasses.replace(s, source=source) for s in image + clue]

    lists = lists_of(TRAINING_WORLD, training, held_out, samples, load, cache)
    root = fit_world_of(settings, job)
    if root is not None:
        fit_cache = FeatureCache(settings.train.out_dir / "cache" / "features" / root.name,
                                 backbone.version)
        entries = load_entries(root, FIT_SPLITS)
        lists += lists_of(FIT_WORLD, entries, {str(e.pid) for e in entries},
                          fit_world_clue_samples(root, job.hpt.seed),
                          lambda key: Image.open(root / key), fit_cache)
        head.cfg.metrics["fit/world_seed"] = float(json.loads(
            (root / "manifest.json").read_text())["seed"])
    image_lists = [s for s in lists if s.match is None]
    head.cfg.memory, memory_figures = fit_memory(head, image_lists)  # kinds fitted on none
    head.cfg.metrics |= memory_figures
    # per kind: memory (and the clue term's weight for text kinds), or abstention where the
    # dialogue does not surely beat the prefilter's order in every regime
    fit = fit_kinds(head, lists)
    head.cfg.clue, head.cfg.kind_memory, head.cfg.abstain = fit.clue, fit.memory, fit.abstain
    head.cfg.traits = fit.traits
    head.cfg.metrics |= fit.figures
    for kind in fit.plain:  # its learned metric lost to the plain cosine on held-out people
        head.make_plain(kind)
    identity = IdentityVision(backbone, head, traits)
    identity.save(model_dir)
    figures = {f"identity/{k}": v for k, v in head.cfg.metrics.items()}
    figures["identity/cached_features"] = float(len(cache))
    if job.eval_dataset_id:
        held = list(iter_samples(settings, job.eval_dataset_id, 3))
        scores = evaluate_best_choice(model, processor, held, load, rule, identity)
        figures |= {f"eval_with_identity/{k}": v for k, v in scores.items()}
    log.info("identity head on %s: %s", backbone.version, figures)
    return figures


def _gate_figures(settings: Settings, model_dir: Path) -> dict[str, float]:
    """The rollout gate's figures for the manifest (``gate/mAP`` reranked,
    ``gate/prefilter_mAP`` the prefilter alone; the gate judges again at rollout). None when the
    gate is off or cannot score it here (logged): figures never fail a training run."""
    if not settings.gate.enabled:
        return {}
    from chatreid.evaluation.gate import serving_embedder, vlm_validation_metrics
    from chatreid.query import ModelSpec, VLMRuntime

    try:
        runtime = VLMRuntime.load(settings, ModelSpec.of_base(str(model_dir)))
        return vlm_validation_metrics(settings, runtime, serving_embedder(settings))
    except Exception as exc:
        log.warning("no rollout gate figures in the manifest: %s: %s", type(exc).__name__, exc)
        return {}


def run_chain(
    settings: Settings,
    stages: Sequence[int],
    configs: dict[int, HPTConfig],
    datasets: dict[int, DatasetReport],
    *,
    world_id: str,
    world_root: Path | None,
    eval_dataset_id: str | None,
    parent: CheckpointEvent | None = None,
    identity_backbone: str | None = None,
    trait_people: int | None = None,
) -> list[StageOutcome]:
    """Stages in order, each from the one before (the first from ``parent`` or the base)."""
    if list(stages) != sorted(set(stages)) or not set(stages) <= {1, 2, 3}:
        raise ValueError(f"stages must be increasing and within 1..3, got {list(stages)}")
    outcomes: list[StageOutcome] = []
    for stage in stages:
        job = StageJob(
            hpt=configs[stage], dataset_id=datasets[stage].dataset_id,
            num_shards=datasets[stage].num_shards, world_id=world_id,
            world_root=str(world_root) if world_root else None, parent=parent,
            eval_dataset_id=eval_dataset_id, identity_backbone=identity_backbone,
            trait_people=trait_people,
        )
        outcome = run_stage(settings, job)
        outcomes.append(outcome)
        parent = outcome.event
    return outcomes
