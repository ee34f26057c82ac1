"""Training recipes: the sizes of one ``chatreid train`` run, and the named presets
(``default``, ``quick``, ``micro``) the CLI, the operator API and the benchmarks choose from.

Plain data (pydantic only), so a service can check a preset's name without importing the
training pipeline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class StageRecipe(BaseModel):
    samples: int = Field(gt=0)
    epochs: int = 1
    lr: float = 2e-5
    encoder_lr: float | None = None
    batch_size: int = 1
    max_steps: int | None = None


class TrainRecipe(BaseModel):
    """Sizes of one training run. ``default`` is sized to finish on a 2-core CPU in < 60 min."""

    synth_size: Literal["small", "tiny"] = "small"
    seed: int = 0
    num_shards: int = 4
    eval_samples: int = 60
    stages: dict[int, StageRecipe]
    embedder_epochs: int = 10
    embedder_size: tuple[int, int] = (256, 128)  # (h, w) the embedder trains and serves at
    embedder_steps_per_epoch: int | None = None  # None: one pass over the train images
    embedder_extra_people: int = Field(
        default=0, ge=0, description="synthetic people of a world of their own that the "
        "embedder also trains on (chatreid.tuning.embedder_training.extra_world_config); 0: "
        "the training world's train split only")
    trait_people: int | None = Field(
        default=270, ge=0, description="synthetic people of a world of their own that the "
        "identity head's trait reader (chatreid.model.traits) also learns persistent traits "
        "from, beside the training world's; 0: the training world's only; None: no trait reader")
    wall_budget_min: float | None = Field(
        default=None, gt=0, description="the wall time (minutes, 2 CPU cores, embedder and the "
        "three stages from a fresh stack) the recipe is sized for; benchmarks/hpt_chain.py "
        "reports the measured run against it. None: no budget (CI sizes)")


PRESETS: dict[str, TrainRecipe] = {
    "default": TrainRecipe(wall_budget_min=60.0, stages={
        1: StageRecipe(samples=300, lr=5e-5, encoder_lr=3e-4),
        2: StageRecipe(samples=500, lr=5e-5, encoder_lr=1e-4),
        3: StageRecipe(samples=600, lr=5e-5),
    }),
    # <= 20 min on 2 CPU cores from a fresh stack: the embedder, a few decoder steps per stage
    # (the decoder alone cannot learn to compare people in CPU minutes), and the identity head
    # on every stage-3 group (cached features: seconds) - what makes the rerank beat the
    # prefilter. The samples not stepped through still train the head.
    "quick": TrainRecipe(
        eval_samples=30, embedder_epochs=4, wall_budget_min=20.0,
        stages={
            1: StageRecipe(samples=40, lr=5e-5, encoder_lr=3e-4, max_steps=10),
            2: StageRecipe(samples=40, lr=5e-5, encoder_lr=1e-4, max_steps=10),
            3: StageRecipe(samples=800, lr=5e-5, max_steps=15),
        },
    ),
    # CI: the tiny model on the tiny world; every mechanism, a few steps each.
    "micro": TrainRecipe(
        synth_size="tiny", num_shards=2, eval_samples=8, embedder_epochs=2, trait_people=0,
        embedder_size=(128, 64), embedder_steps_per_epoch=4,
        stages={s: StageRecipe(samples=12, lr=1e-3, max_steps=6) for s in (1, 2, 3)},
    ),
}
