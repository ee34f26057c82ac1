"""``chatreid train``: the whole training pipeline on one recipe.

world (synthesised if missing) → uploaded to object storage → instruction datasets per stage
(data engine, Ray Data) → [prefilter embedder] → HPT stages as Ray Train jobs, each pushed with a
manifest and a checkpoint event → a report (JSON + table) of speed, memory and accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from chatreid.checkpoints import latest
from chatreid.cluster import connect
from chatreid.config import Settings
from chatreid.data.build import InstructionDatasetSpec, build_dataset
from chatreid.data.report import DatasetReport
from chatreid.data.worlds import upload_world
from chatreid.tuning.hpt import HPTConfig
from chatreid.tuning.presets import PRESETS, TrainRecipe
from ray_jobs.hpt import ABLATIONS, MODEL_NAME, StageOutcome, run_chain
from schemas import CheckpointEvent

if TYPE_CHECKING:
    from chatreid.synth import SynthConfig

Target = Literal["embedder", "1", "2", "3", "all"]


class TrainReport(BaseModel):
    world_id: str
    base_model: str
    stages: list[StageOutcome] = []
    datasets: dict[int, DatasetReport] = {}
    embedder: CheckpointEvent | None = None
    wall_s: float = 0.0
    out_dir: str = ""


def world_config(recipe: TrainRecipe) -> SynthConfig:
    """The training world the recipe names (its size and seed)."""
    from chatreid.synth import SynthConfig

    if recipe.synth_size == "tiny":
        return SynthConfig.tiny(seed=recipe.seed)
    return SynthConfig(seed=recipe.seed)


def ensure_world(settings: Settings, recipe: TrainRecipe, console: Console) -> Path:
    """The configured world directory, synthesised (deterministically) if it is not there."""
    from chatreid.synth import generate_world

    root = settings.train.world.resolve()  # workers run in their own working directory
    if not (root / "attributes" / "attributes.json").is_file():
        console.print(f"synthesising a {recipe.synth_size} world into {root}")
        generate_world(root, world_config(recipe), progress=True)
    return root


def ensure_extra_world(world: Path, recipe: TrainRecipe, console: Console) -> Path | None:
    """The embedder's extra people (``recipe.embedder_extra_people``) beside the training
    world, synthesised (deterministically) if not there; None when the recipe has none."""
    from chatreid.synth import generate_world
    from chatreid.tuning.embedder_training import extra_world_config

    if not recipe.embedder_extra_people:
        return None
    cfg = extra_world_config(world_config(recipe), recipe.embedder_extra_people)
    root = world.with_name(f"{world.name}-people{cfg.n_identities}-seed{cfg.seed}")
    if not (root / "attributes" / "attributes.json").is_file():
        console.print(f"synthesising {cfg.n_identities} more people for the embedder into {root}")
        generate_world(root, cfg, progress=True)
    return root


def stage_config(settings: Settings, recipe: TrainRecipe, stage: int) -> HPTConfig:
    r = recipe.stages[stage]
    return HPTConfig(
        stage=stage, base_model=settings.train.base_model, epochs=r.epochs, lr=r.lr,
        encoder_lr=r.encoder_lr, batch_size=r.batch_size, max_steps=r.max_steps,
        seed=recipe.seed,
    )


def vlm_stages(target: Target, ablation: str | None) -> tuple[int, ...]:
    if target == "embedder":
        return ()
    if target == "all":
        if ablation is not None and ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}")
        return ABLATIONS[ablation or "1+2+3"]
    if ablation is not None:
        raise ValueError("--ablation applies to --stage all")
    return (int(target),)


def parent_for(
    settings: Settings, stages: tuple[int, ...], target: Target
) -> CheckpointEvent | None:
    """A single stage 2 or 3 continues the newest pushed checkpoint of the stage before it."""
    if target not in ("2", "3"):
        return None
    parent = latest(settings, MODEL_NAME, f"stage{stages[0] - 1}")
    if parent is None:
        raise LookupError(f"stage {target} needs a stage {stages[0] - 1} checkpoint; "
                          f"train it first (chatreid train --stage {stages[0] - 1})")
    return parent


def train(
    settings: Settings,
    target: Target = "all",
    *,
    recipe: TrainRecipe | None = None,
    ablation: str | None = None,
    include_embedder: bool = True,
    console: Console | None = None,
) -> TrainReport:
    """Run ``target`` ("embedder", one stage, or "all" = embedder + the ablation's stages)."""
    console = console or Console()
    recipe = recipe or PRESETS["default"]
    stages = vlm_stages(target, ablation)
    t0 = time.perf_counter()
    connect(settings)
    world = ensure_world(settings, recipe, console)
    wid = upload_world(settings, world)
    report = TrainReport(world_id=wid, base_model=settings.train.base_model,
                         out_dir=str(settings.train.out_dir))
    if target == "embedder" or (target == "all" and include_embedder):
        report.embedder = train_embedder_stage(settings, recipe, world, console)
    if stages:
        parent = parent_for(settings, stages, target)
        for stage in stages:
            # vlm_stages yields only 1, 2 or 3 (the spec re-validates it)
            spec = InstructionDatasetSpec(world_root=world, stage=cast(Literal[1, 2, 3], stage),
                                          seed=recipe.seed,
                                          num_samples=recipe.stages[stage].samples,
                                          num_shards=recipe.num_shards,
                                          real=_real_images(settings, stage))
            report.datasets[stage] = build_dataset(settings, spec)
        eval_spec = InstructionDatasetSpec(world_root=world, stage=3, seed=recipe.seed + 1,
                                           num_samples=recipe.eval_samples, num_shards=1,
                                           splits=("test",))
        eval_id = build_dataset(settings, eval_spec).dataset_id
        backbone = identity_source(settings, report.embedder)
        if 3 in stages and backbone == "prefilter":
            note_unserved_embedder(settings, console)
        report.stages = run_chain(
            settings, stages, {s: stage_config(settings, recipe, s) for s in stages},
            report.datasets, world_id=wid, world_root=world, eval_dataset_id=eval_id,
            parent=parent, identity_backbone=backbone, trait_people=recipe.trait_people,
        )
    report.wall_s = time.perf_counter() - t0
    out = settings.train.out_dir / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    console.print(report_table(report))
    console.print(f"report: {out}")
    return report


def _real_images(settings: Settings, stage: int):
    """Real people for stages 2 and 3 when ``train.real_root`` is set (stage 1 captions
    attributes, which real images do not have)."""
    from chatreid.data.instructions.real import RealImages

    t = settings.train
    if t.real_root is None or stage == 1:
        return None
    return RealImages(root=t.real_root, share=t.real_share)


def identity_source(settings: Settings, embedder: CheckpointEvent | None) -> str | None:
    """The identity head's backbone: the chain's new embedder when it trained one and the
    setting is 'prefilter' (it is what the prefilter serves once rolled out); None for 'none'."""
    source = settings.train.vision_backbone
    if source == "none":
        return None
    return embedder.version if source == "prefilter" and embedder is not None else source


def note_unserved_embedder(settings: Settings, console: Console) -> None:
    """'prefilter' gives the identity head the embedder serving now; say so when a newer
    trained embedder has not been rolled out (its index not rebuilt), so the head does not
    silently sit on an older backbone than the operator expects."""
    from chatreid.evaluation.gate import serving_embedder

    newest = latest(settings, "embedder", "embedder")
    serving = serving_embedder(settings).version
    if newest is not None and newest.version != serving:
        console.print(f"[yellow]the identity head trains over the serving embedder {serving}; "
                      f"the newest trained one, {newest.version}, is not rolled out (its index "
                      "is not rebuilt). Roll it out first, or set train.vision_backbone to its "
                      "version.[/yellow]")


def train_embedder_stage(
    settings: Settings, recipe: TrainRecipe, world: Path, console: Console
) -> CheckpointEvent:
    from chatreid.tuning.embedder_training import EmbedderTrainConfig
    from ray_jobs.train_embedder import train_embedder

    t = settings.train
    extra = ensure_extra_world(world, recipe, console)
    cfg = EmbedderTrainConfig(
        world_root=world, extra_worlds=[extra] if extra else [], real_root=t.real_root,
        start=t.embedder_start, teacher=t.embedder_teacher, epochs=recipe.embedder_epochs,
        seed=recipe.seed,
        height=recipe.embedder_size[0], width=recipe.embedder_size[1],
        steps_per_epoch=recipe.embedder_steps_per_epoch,
    )
    parent = latest(settings, "embedder", "embedder")
    return train_embedder(settings, cfg, parent_version=parent.version if parent else None,
                          console=console)


def report_table(report: TrainReport) -> Table:
    table = Table("stage", "version", "parent", "wall s", "samples/s", "peak MiB",
                  "loss first→last", "rank-1 (chance)", title=f"HPT on {report.base_model}")
    if report.embedder is not None:
        m = report.embedder.metrics
        table.add_row("embedder", report.embedder.version, report.embedder.parent_version or "-",
                      "", "", "", "", f"{m.get('rank1', float('nan')):.3f}")
    for s in report.stages:
        m = s.metrics
        table.add_row(
            str(s.stage), s.version, s.parent_version or "base", f"{s.wall_s:.0f}",
            f"{m.get('samples_per_s', 0):.2f}", f"{m.get('peak_rss_mib', 0):.0f}",
            f"{m.get('first_loss', 0):.2f}→{m.get('loss', 0):.2f}",
            f"{m.get('eval/rank1', float('nan')):.3f} ({m.get('eval/chance_rank1', 0):.3f})",
        )
    return table
