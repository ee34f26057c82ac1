"""Prefilter embedder training (metric learning on Ray Train) and its publication."""

from __future__ import annotations

import json
import shutil
import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from chatreid.bus import make_producer
from chatreid.checkpoints import pull, push
from chatreid.data.datasets.market1501 import Market1501
from chatreid.embedder import (
    CHECKPOINT_FILE,
    Embedder,
    build_embedder,
    embedder_from_checkpoint,
    imagenet_model,
)
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.releases import CheckpointWatcher
from chatreid.prefilter.search import PrefilterSearch
from chatreid.storage import ObjectStore
from chatreid.synth import SynthConfig, generate_world
from chatreid.tuning.embedder_training import (
    HISTORY_FILE,
    EmbedderTrainConfig,
    PKSampler,
    augment,
    evaluate_embedder,
    extra_world_config,
    model_id_for,
    train_images,
    train_split_hash,
    triplet_hard_loss,
)
from schemas import CheckpointEvent, CropEvent
from services.embedder import EmbedderService, EmbeddingNode, Reindexer
from services.ingestor import Ingestor
from services.ingestor.sources import synth_source

from .conftest import read_dead_letters

# 40 people (20 for training), 3 RGB cameras, 128x64 crops: ~3 s to render; 148 train images,
# 46 queries against 103 gallery images
WORLD = SynthConfig.tiny(seed=0, n_identities=40, n_distractors=2, images_per_camera=(2, 4))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(tmp_path_factory.mktemp("world"), WORLD, progress=False).root


def small_config(world: Path, **overrides) -> EmbedderTrainConfig:
    base = dict(world_root=world, epochs=3, steps_per_epoch=8, p=8, k=4, warmup_steps=2,
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
    copy = tmp_path / "copy"
    shutil.copytree(world / "market1501", copy / "market1501")
    assert train_split_hash(copy) == train_split_hash(world)
    first = sorted((copy / "market1501" / "bounding_box_train").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-1] + b"\x00")
    assert train_split_hash(copy) != train_split_hash(world)


def test_extra_people_train_beside_the_world_and_stay_other_people(world: Path,
                                                                    tmp_path: Path) -> None:
    extra_cfg = extra_world_config(WORLD, 12)
    # other people than the training world's and the fit world's, each in several outfits
    assert extra_cfg.seed not in (WORLD.seed, WORLD.seed + 1_000_003_000)
    assert extra_cfg.n_distractors == 0 and extra_cfg.outfits_per_identity[0] >= 2
    extra = generate_world(tmp_path / "extra", extra_cfg, progress=False).root
    alone, both = train_images(world), train_images(world, extra_worlds=[extra])
    extra_ids = {i.identity for i in both} - {i.identity for i in alone}
    # the same pid in two worlds is two people: none of the extra labels is a world label
    assert extra_ids and all(i.startswith("extra1/") for i in extra_ids)
    assert len(extra_ids) == Market1501(extra).num_train_pids >= 10  # ~90 % of the 12
    assert [i for i in both if not i.identity.startswith("extra1/")] == alone
    # the data hash (the manifest's, and the Ray run a re-run resumes) covers them
    assert train_split_hash(world, extra_worlds=[extra]) != train_split_hash(world)


def test_evaluate_embedder_baseline(world: Path) -> None:
    scores = evaluate_embedder(build_embedder(height=128, width=64), world)
    ds = Market1501(world)
    # every score is a fraction of the queries (rank-k) or an average precision
    assert set(scores) == {"rank1", "rank5", "rank10", "mAP"}
    assert 0 < scores["rank1"] <= scores["rank5"] <= scores["rank10"] <= 1
    hits = scores["rank1"] * len(ds.query)
    assert hits == pytest.approx(round(hits), abs=1e-6)


# -- the Ray Train job -----------------------------------------------------------------------


@pytest.mark.stack
def test_training_lowers_the_loss_beats_imagenet_and_publishes(settings, world, ray_session,
                                                                tmp_path):
    from ray_jobs.train_embedder import train_embedder

    cfg = small_config(world)
    event = train_embedder(settings, cfg, parent_version="imagenet-test")
    m = event.metrics
    assert (event.model, event.stage, event.parent_version) == ("embedder", "embedder",
                                                                 "imagenet-test")
    # the manifest verifies and carries what the job measured
    manifest = pull(settings, event, tmp_path / "ckpt")
    assert manifest["data_hash"] == train_split_hash(world)
    assert manifest["config"]["epochs"] == 3 and manifest["metrics"] == m
    assert sorted(f["path"] for f in manifest["files"]) == [CHECKPOINT_FILE, HISTORY_FILE]
    history = json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())
    losses = [h["loss"] for h in history]
    assert len(losses) == 3 and all(a > b for a, b in pairwise(losses)), losses
    # the pushed embedder is the one measured: same version, same scores when re-evaluated
    embedder = embedder_from_checkpoint(tmp_path / "ckpt" / CHECKPOINT_FILE)
    assert embedder.version == event.version and embedder.version.endswith("@128x64")
    again = evaluate_embedder(embedder, world)
    assert again["mAP"] == pytest.approx(m["mAP"], abs=1e-6)
    assert again["rank1"] == pytest.approx(m["rank1"], abs=1e-6)
    # the scores are measured (rank-1 is a whole number of the 46 queries) on people never seen
    # in training; at 24 steps mAP is up (0.289 -> 0.328 here), rank-1 not yet (0.326 -> 0.283)
    baseline = evaluate_embedder(build_embedder(height=128, width=64), world)
    assert m["baseline_mAP"] == pytest.approx(baseline["mAP"])
    hits = m["rank1"] * len(Market1501(world).query)
    assert hits == pytest.approx(round(hits), abs=1e-6)
    assert m["mAP"] > baseline["mAP"], m
    # training took hold: the people it was trained on are found far better (0.34 -> 0.56)
    seen_before = evaluate_embedder(build_embedder(height=128, width=64), world, split="train")
    seen_after = evaluate_embedder(embedder, world, split="train")
    assert seen_after["mAP"] > seen_before["mAP"] + 0.1, (seen_before, seen_after)
    assert m["samples_per_s"] > 0

    # the same job again resumes its finished run from the bucket instead of training anew
    t0 = time.perf_counter()
    again = train_embedder(settings, cfg)
    assert again.version == event.version and again.metrics["steps"] == m["steps"]
    assert time.perf_counter() - t0 < 0.6 * m["job_wall_s"] + 10


# -- rollout: the embedding service and the search side move to a new checkpoint --------------


class HeldProducer:
    """Stands in for a Kafka producer so a test can tamper with a checkpoint before announcing
    it (``push`` uploads, then publishes)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes):
        self.sent.append((topic, key, value))
        return self

    def get(self, timeout: float) -> None:
        return None


def make_release(settings, tmp_path: Path, seed: int = 1, producer=None) -> CheckpointEvent:
    """A new embedding space (ImageNet backbone, a random 64-d projection + BNNeck), pushed."""
    torch.manual_seed(seed)
    net = imagenet_model(projection_dim=64, bnneck=True)
    embedder = Embedder(net, model_id=model_id_for(net), height=128, width=64)
    out = tmp_path / f"release-{seed}"
    embedder.save(out / CHECKPOINT_FILE)
    return push(settings, out, model="embedder", stage="embedder", version=embedder.version,
                producer=producer)


def ingest(settings, n: int, seed: int) -> list[CropEvent]:
    ingestor = Ingestor(settings, source="synth")
    events = [ingestor.submit(c).event for c in synth_source(seed, n, None, start_time=1.7e9)]
    ingestor.close()
    assert all(events)
    return events


def wait_for(condition, timeout_s: float = 60.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)
    return value


class Running:
    """An EmbeddingNode in a thread, as ``chatreid embed`` runs it."""

    def __init__(self, settings, **kw) -> None:
        self.node = EmbeddingNode(settings, settle_s=0.3, **kw)
        self.thread = threading.Thread(target=self.node.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.node.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def searchable(reader: PrefilterSearch, n: int):
    return lambda: reader.refresh() >= n


@pytest.mark.stack
def test_search_answers_from_the_old_index_during_the_rebuild_then_switches(settings, tmp_path):
    settings.gate.enabled = False  # rollout mechanics; the gate: tests/test_gate.py
    first = ingest(settings, 24, seed=0)
    running = Running(settings, reindex=False)  # a replica that leaves the rebuild to another
    try:
        reader = PrefilterSearch(settings)
        wait_for(searchable(reader, 24))
        old = reader.version
        query = reader.crop_image(first[0].crop_id)
        assert reader.search(query, k=1)[0].crop_id == first[0].crop_id

        new = make_release(settings, tmp_path).version
        # the service verified and loaded it, and now writes every new crop under both
        wait_for(lambda: running.node.service.versions == [old, new])
        later = ingest(settings, 8, seed=1)
        wait_for(searchable(reader, 32))  # the live index keeps growing ...
        assert (reader.version, reader.pending_version) == (old, new)  # ... and is still live
        hits = reader.search(query, k=3)
        assert hits[0].crop_id == first[0].crop_id and hits[0].score > 0.999

        # the rebuild the reindexing replica runs: the 24 crops only the old index holds
        watcher = CheckpointWatcher(settings, dead_letters=False)
        release = watcher.newest(watcher.catch_up())
        watcher.close()
        report = Reindexer(settings, settle_s=0.3).run(old, release.embedder, release.source)
        assert (report.reindexed, report.unembeddable) == (24, ())

        wait_for(lambda: reader.refresh() and reader.version == new)
        version, store = reader.index.active()
        assert version == new and store.dim == 64
        assert store.crop_ids() == {e.crop_id for e in first + later}
        top = reader.search(query, k=1)[0]  # embedded by the new embedder, in the new index
        assert top.crop_id == first[0].crop_id and top.score > 0.999
        # the replica saw the report and stopped writing the old version
        wait_for(lambda: running.node.service.versions == [new])
    finally:
        running.stop()
    # a fresh reader starts on the rolled-out embedder directly
    fresh = PrefilterSearch(settings)
    assert (fresh.version, fresh.pending_version) == (new, None)
    assert fresh.refresh() == 32


@pytest.mark.stack
def test_the_service_rebuilds_in_the_background_while_queries_keep_answering(settings,
                                                                            tmp_path):
    settings.gate.enabled = False  # rollout mechanics; the gate: tests/test_gate.py
    crops = ingest(settings, 24, seed=2)
    running = Running(settings)  # the snapshot replica: it also rebuilds
    try:
        reader = PrefilterSearch(settings)
        wait_for(searchable(reader, 24))
        old = reader.version
        query = reader.crop_image(crops[5].crop_id)
        new = make_release(settings, tmp_path, seed=3).version

        seen: list[str] = []
        while reader.version != new:
            reader.refresh(timeout_s=30)
            top = reader.search(query, k=1)[0]  # never an error, never an empty answer
            assert top.crop_id == crops[5].crop_id and top.score > 0.999
            seen.append(reader.version)
            assert len(seen) < 300, "the rollout did not finish"
        assert seen[0] == old and seen[-1] == new
        assert seen == sorted(seen, key=lambda v: v == new)  # old ... old, new ...: no flapping
        assert reader.index.active()[1].crop_ids() == {c.crop_id for c in crops}
        wait_for(lambda: running.node.rollout.completed == [new])
        assert running.node.service.versions == [new]
    finally:
        running.stop()
    # the replica's own index switched too and its snapshot is of the new version
    restored = IndexFollower(settings, embedder_version=new)
    assert restored.restore() and len(restored.store) == 24


@pytest.mark.stack
def test_a_corrupted_checkpoint_is_refused_and_the_service_keeps_running(settings, tmp_path):
    ingest(settings, 8, seed=4)
    running = Running(settings)
    try:
        reader = PrefilterSearch(settings)
        wait_for(searchable(reader, 8))
        old = reader.version

        held = HeldProducer()
        event = make_release(settings, tmp_path, seed=5, producer=held)
        ObjectStore(settings.s3).put(f"{event.prefix}/{CHECKPOINT_FILE}", b"tampered")
        producer = make_producer(settings.kafka)
        for topic, key, value in held.sent:  # now announce it
            producer.send(topic, key=key, value=value).get(timeout=30)
        producer.close()

        letters = read_dead_letters(settings, expect=1)
        assert [(d.error, d.origin) for d in letters] == [("checkpoint.corrupt", event.version)]
        assert "does not match its manifest" in letters[0].reason
        # still embedding with the old one, and still indexing
        assert running.node.service.versions == [old]
        ingest(settings, 4, seed=6)
        wait_for(searchable(reader, 12))
        assert (reader.version, reader.pending_version) == (old, None)
    finally:
        running.stop()



@pytest.mark.stack
def test_a_crop_that_cannot_be_re_embedded_is_reported_and_does_not_block_the_switch(settings,
                                                                                   tmp_path):
    settings.gate.enabled = False  # rollout mechanics; the gate: tests/test_gate.py
    crops = ingest(settings, 6, seed=7)
    service = EmbedderService(settings)
    old = service.embedder.version
    assert service.run(until_idle_s=2).indexed == 6
    ObjectStore(settings.s3).delete(crops[2].object_key)  # e.g. removed by a retention policy

    event = make_release(settings, tmp_path, seed=8)
    watcher = CheckpointWatcher(settings, dead_letters=False)
    release = watcher.newest(watcher.catch_up())
    watcher.close()
    report = Reindexer(settings, settle_s=0.1).run(old, release.embedder, release.source)
    assert (report.reindexed, report.unembeddable) == (5, (crops[2].crop_id,))
    letters = read_dead_letters(settings, expect=1)
    assert [(d.error, d.origin) for d in letters] == [("crop.missing", crops[2].crop_id)]

    reader = IndexFollower(settings, embedder_version=old)
    reader.prepare(event.version)
    reader.catch_up()  # the report excuses the lost crop: the switch happens
    version, store = reader.active()
    assert version == event.version
    assert store.crop_ids() == {c.crop_id for c in crops} - {crops[2].crop_id}
    reader.close()


def test_the_command_line_sets_the_embedders_extra_people_and_steps_over_the_preset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`chatreid train --extra-people N --embedder-steps S` is how an operator with more time
    than a preset's budget uses the option; the rest of the preset stays as it is."""
    from typer.testing import CliRunner

    import ray_jobs.train
    from chatreid.app.cli import app
    from chatreid.tuning.presets import PRESETS

    seen = {}
    monkeypatch.setattr(ray_jobs.train, "train",
                        lambda _s, stage, recipe, **_: seen.update(stage=stage, recipe=recipe))
    result = CliRunner().invoke(app, ["train", "--stage", "embedder", "--preset", "quick",
                                      "--extra-people", "270", "--embedder-steps", "30"])
    assert result.exit_code == 0, result.output
    recipe = seen["recipe"]
    assert (recipe.embedder_extra_people, recipe.embedder_steps_per_epoch) == (270, 30)
    assert recipe.model_copy(update={"embedder_extra_people": 0,
                                     "embedder_steps_per_epoch": None}) == PRESETS["quick"]
    assert PRESETS["quick"].embedder_extra_people == 0  # the preset itself is not changed
    result = CliRunner().invoke(app, ["train", "--extra-people", "-1"])
    assert result.exit_code == 2
