"""Prefilter embedder training (metric learning on Ray Train) and its publication."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatreid.checkpoints import pull
from chatreid.data.datasets.market1501 import Market1501
from chatreid.embedder import CHECKPOINT_FILE, build_embedder, embedder_from_checkpoint
from chatreid.embedder.training import (
    HISTORY_FILE,
    EmbedderTrainConfig,
    PKSampler,
    augment,
    evaluate_embedder,
    train_split_hash,
    triplet_hard_loss,
)
from chatreid.synth import SynthConfig, generate_world

# 80 people (40 for training), 3 RGB cameras, 128x64 crops: ~5 s to render; 287 train images,
# 96 queries against 206 gallery images
WORLD = SynthConfig.tiny(seed=0, n_identities=80, n_distractors=2, images_per_camera=(2, 4))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(tmp_path_factory.mktemp("world"), WORLD, progress=False).root


@pytest.fixture
def stack(settings):
    """The per-test namespace, and its bucket removed afterwards: the local SeaweedFS gives each
    bucket its own volumes and has a fixed number of them."""
    yield settings
    from chatreid.storage import ObjectStore

    objects = ObjectStore(settings.s3)
    for key in objects.list(""):
        objects.delete(key)
    objects.client.remove_bucket(settings.s3.bucket)


def small_config(world: Path, **overrides) -> EmbedderTrainConfig:
    base = dict(world_root=world, epochs=4, steps_per_epoch=8, p=8, k=4, warmup_steps=2,
                height=128, width=64, seed=0)
    return EmbedderTrainConfig(**{**base, **overrides})


# -- pieces ----------------------------------------------------------------------------------


def test_pk_sampler_batches_are_p_by_k_and_disjoint_across_ranks() -> None:
    labels = np.repeat(np.arange(10), [6, 6, 5, 4, 3, 8, 6, 6, 2, 7])
    ranks = [PKSampler(labels, p=4, k=4, steps=5, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    batches = [list(s) for s in ranks]
    assert [len(b) for b in batches] == [5, 5]
    for batch in batches[0] + batches[1]:
        counts = np.bincount(labels[batch])
        assert len(batch) == 16 and counts[counts > 0].tolist() == [4] * 4
    # the two ranks take different slices of one global sequence
    assert all(a != b for a, b in zip(batches[0], batches[1], strict=True))
    again = PKSampler(labels, p=4, k=4, steps=5, seed=1, rank=0, world_size=2)
    again.set_epoch(3)
    assert list(again) == batches[0]  # deterministic per (seed, epoch): resumable
    again.set_epoch(4)
    assert list(again) != batches[0]


def test_pk_sampler_needs_two_identities_and_caps_p() -> None:
    with pytest.raises(ValueError, match="at least 2 identities"):
        PKSampler([0, 0, 0], p=2, k=2)
    sampler = PKSampler([0, 0, 1, 1, 2], p=8, k=2)
    assert sampler.p == 3 and all(len(b) == 6 for b in sampler)


def test_triplet_hard_loss_picks_the_hardest_pairs() -> None:
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: farthest positive 3, nearest negative 1 -> 3 - 1 + 0.5
    # anchor 1: positive 3, negative 2 -> 1.5;  anchor 2: positive 9, negative 1 -> 8.5
    # anchor 3: positive 9, negative 7 -> 2.5
    expected = np.mean([2.5, 1.5, 8.5, 2.5])
    assert triplet_hard_loss(feats, labels, 0.5).item() == pytest.approx(expected)


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.randn(6, 3, 32, 16)
    a = augment(x, pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    b = augment(x, pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(augment(x, pad=0, flip=False, generator=torch.Generator()), x)


def test_train_split_hash_changes_with_the_split(world: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(world / "market1501", copy / "market1501")
    assert train_split_hash(copy) == train_split_hash(world)
    first = sorted((copy / "market1501" / "bounding_box_train").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-1] + b"\x00")
    assert train_split_hash(copy) != train_split_hash(world)


def test_evaluate_embedder_baseline(world: Path) -> None:
    scores = evaluate_embedder(build_embedder(height=128, width=64), world)
    ds = Market1501(world)
    # every score is a fraction of the queries (rank-k) or an average precision
    assert set(scores) == {"rank1", "rank5", "rank10", "mAP"}
    assert 0 < scores["rank1"] <= scores["rank5"] <= scores["rank10"] <= 1
    assert round(scores["rank1"] * len(ds.query)) == pytest.approx(scores["rank1"] * len(ds.query))


# -- the Ray Train job -----------------------------------------------------------------------


@pytest.mark.stack
def test_training_lowers_the_loss_beats_imagenet_and_publishes(stack, world, ray_session,
                                                                tmp_path):
    settings = stack
    from chatreid.ray_jobs.train_embedder import train_embedder

    cfg = small_config(world)
    event = train_embedder(settings, cfg, parent_version="imagenet-test")
    m = event.metrics
    assert (event.model, event.stage, event.parent_version) == ("embedder", "embedder",
                                                                 "imagenet-test")
    # the manifest verifies and carries what the job measured
    manifest = pull(settings, event, tmp_path / "ckpt")
    assert manifest["data_hash"] == train_split_hash(world)
    assert manifest["config"]["epochs"] == 4 and manifest["metrics"] == m
    assert sorted(f["path"] for f in manifest["files"]) == [CHECKPOINT_FILE, HISTORY_FILE]
    history = json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())
    losses = [h["loss"] for h in history]
    assert len(losses) == 4 and all(a > b for a, b in zip(losses, losses[1:])), losses
    # the pushed embedder is the one measured: same version, same scores when re-evaluated
    embedder = embedder_from_checkpoint(tmp_path / "ckpt" / CHECKPOINT_FILE)
    assert embedder.version == event.version and embedder.version.endswith("@128x64")
    again = evaluate_embedder(embedder, world)
    assert again["mAP"] == pytest.approx(m["mAP"], abs=1e-6)
    assert again["rank1"] == pytest.approx(m["rank1"], abs=1e-6)
    # metric learning beats the ImageNet features on identities it never saw
    baseline = evaluate_embedder(build_embedder(height=128, width=64), world)
    assert m["baseline_mAP"] == pytest.approx(baseline["mAP"])
    assert m["mAP"] > baseline["mAP"] + 0.03, m
    # rank-1 is measured, not estimated: a whole number of the queries with a match
    assert (m["rank1"] * len(Market1501(world).query)) % 1 == pytest.approx(0, abs=1e-9)
    assert m["samples_per_s"] > 0
