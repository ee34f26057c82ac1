"""The instruction data engine: determinism with and without Ray, manifests that catch a tampered
shard, the stats report, shard partitioning across workers, and images read from the bucket."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from chatreid.data import (
    CorruptShardError,
    DatasetError,
    ImageResolver,
    InstructionDatasetSpec,
    WorldError,
    build_dataset,
    iter_samples,
    load_manifest,
    load_report,
    render_report,
    resolve_image,
    shards_for_worker,
    upload_world,
    world_id,
)
from chatreid.data.build import encode_samples, shard_samples, verify
from chatreid.data.instructions import STAGE2_MIX
from chatreid.data.worlds import annotated_root
from chatreid.storage import ObjectStore

stack = pytest.mark.stack


def spec_for(world: Path, **kw: object) -> InstructionDatasetSpec:
    base: dict[str, object] = {"world_root": world, "stage": 2, "num_samples": 300, "seed": 5,
                               "num_shards": 3}
    return InstructionDatasetSpec(**{**base, **kw})


def shard_bytes(settings, dataset_id: str, stage: int) -> list[bytes]:
    store = ObjectStore(settings.s3)
    return [store.get(s.key) for s in load_manifest(settings, dataset_id, stage).shards]


# ----------------------------------------------------------------------------- spec


def test_spec_identity_and_shard_plan(world: Path) -> None:
    spec = spec_for(world, num_samples=302)
    assert spec.shard_counts() == [101, 101, 100]
    assert len(set(spec.shard_seeds())) == 3
    assert spec.dataset_id() == spec_for(world, num_samples=302).dataset_id()
    changed = [
        spec_for(world, num_samples=302, seed=6),
        spec_for(world, num_samples=302, num_shards=2),
        spec_for(world, num_samples=302, overrides={"gallery_size": [3, 6]}),
        spec_for(world, num_samples=302, stage=3),
    ]
    assert len({spec.dataset_id(), *(s.dataset_id() for s in changed)}) == 5


def test_spec_rejects_bad_overrides_and_empty_shards(world: Path) -> None:
    with pytest.raises(ValueError, match="gallery_sise"):
        spec_for(world, overrides={"gallery_sise": [3, 6]})
    with pytest.raises(ValueError, match="min_hieght"):
        spec_for(world, overrides={"caption_filter": {"min_hieght": 10}})
    with pytest.raises(ValueError, match="at least 2 images"):
        spec_for(world, overrides={"gallery_size": [1, 6]})
    with pytest.raises(ValueError, match="would be empty"):
        spec_for(world, num_samples=2, num_shards=3)


def test_shards_for_worker_round_robin() -> None:
    assert shards_for_worker(5, 0, 2) == [0, 2, 4]
    assert shards_for_worker(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="rank 2"):
        shards_for_worker(5, 2, 2)
    with pytest.raises(ValueError, match="no data"):
        shards_for_worker(1, 0, 2)


def test_image_paths_cannot_escape_the_world(world: Path) -> None:
    assert resolve_image(world, "market1501/query/x.jpg") == world / "market1501/query/x.jpg"
    for bad in ("../secret.jpg", "/etc/passwd", "a/../../b.jpg", ""):
        with pytest.raises(WorldError):
            resolve_image(world, bad)


# ----------------------------------------------------------------------------- building


@stack
@pytest.mark.usefixtures("ray_session")
def test_ray_and_in_process_builds_write_identical_bytes(settings, world: Path) -> None:
    spec = spec_for(world)
    local = build_dataset(settings, spec, use_ray=False)
    local_bytes = shard_bytes(settings, local.dataset_id, 2)
    local_manifest = load_manifest(settings, local.dataset_id, 2)

    distributed = build_dataset(settings, spec, use_ray=True, force=True)
    assert not distributed.reused
    assert distributed == local
    assert shard_bytes(settings, local.dataset_id, 2) == local_bytes
    assert load_manifest(settings, local.dataset_id, 2) == local_manifest
    assert [s.count for s in local_manifest.shards] == [100, 100, 100]

    # Portable: world-relative image paths that resolve under the local world.
    assert all(str(world) not in b.decode() for b in local_bytes)
    for sample in iter_samples(settings, local.dataset_id, 2, shards=[0]):
        assert all(resolve_image(world, p).is_file() for p in sample.images)


@stack
def test_manifest_verifies_and_a_tampered_shard_is_rejected(settings, world: Path) -> None:
    report = build_dataset(settings, spec_for(world), use_ray=False)
    manifest = load_manifest(settings, report.dataset_id, 2)
    assert sum(s.count for s in manifest.shards) == manifest.num_samples == 300
    verify(settings, manifest)
    assert build_dataset(settings, spec_for(world), use_ray=False).reused

    store = ObjectStore(settings.s3)
    key = manifest.shards[1].key
    tampered = bytearray(store.get(key))
    tampered[len(tampered) // 2] ^= 1  # one flipped bit
    store.put(key, bytes(tampered))
    assert list(iter_samples(settings, report.dataset_id, 2, shards=[0]))  # others still read
    with pytest.raises(CorruptShardError, match=r"part-00001\.jsonl"):
        list(iter_samples(settings, report.dataset_id, 2))
    with pytest.raises(CorruptShardError, match=r"part-00001\.jsonl"):
        verify(settings, manifest)
    rebuilt = build_dataset(settings, spec_for(world), use_ray=False)  # a bad build is redone
    assert not rebuilt.reused
    verify(settings, load_manifest(settings, report.dataset_id, 2))


@stack
def test_unknown_dataset_and_shard_are_named(settings) -> None:
    with pytest.raises(DatasetError, match="unknown instruction dataset 'feedbeef'"):
        iter_samples(settings, "feedbeef", 2)
    with pytest.raises(DatasetError, match="feedbeef"):
        load_report(settings, "feedbeef", 2)


# ----------------------------------------------------------------------------- the report


@stack
def test_stats_report_counts_what_was_written(settings, world: Path) -> None:
    report = build_dataset(settings, spec_for(world, num_samples=2000, num_shards=4),
                           use_ray=False)
    assert load_report(settings, report.dataset_id, 2) == report
    samples = list(iter_samples(settings, report.dataset_id, 2))
    counts = Counter(s.task for s in samples)
    assert {t: s.count for t, s in report.tasks.items()} == dict(counts)
    assert report.num_samples == len(samples) == 2000
    total = sum(STAGE2_MIX.values())
    for task, stats in report.tasks.items():
        assert stats.fraction == pytest.approx(stats.count / 2000)
        assert abs(stats.fraction - STAGE2_MIX[task] / total) < 0.03, task
        assert sum(stats.images_per_sample.values()) == stats.count
        for histogram in stats.answers.values():
            assert sum(histogram.values()) == stats.count

    pairs = [s for s in samples if s.task == "ii_one_to_one"]
    yes = sum(s.answer["match"] for s in pairs)
    assert report.tasks["ii_one_to_one"].answers["yes/no"] == {"no": len(pairs) - yes, "yes": yes}
    galleries = [s for s in samples if s.task == "ii_many_to_many"]
    assert report.tasks["ii_many_to_many"].gallery_size == {
        k: v for k, v in sorted(Counter(s.meta["gallery_size"] for s in galleries).items())
    }
    assert report.images == len({p for s in samples for p in s.images})
    assert report.identities == len({p for s in samples for p in s.meta["pids"]})
    assert report.response_words.min <= report.response_words.p50 <= report.response_words.max

    console = Console(record=True, width=200)
    console.print(render_report(report))
    text = console.export_text()
    assert report.dataset_id in text and all(task in text for task in report.tasks)


# ----------------------------------------------------------------------------- reading


def lines(settings, dataset_id: str, shards: list[int] | None = None) -> list[str]:
    return [json.dumps(s.model_dump(), sort_keys=True)
            for s in iter_samples(settings, dataset_id, 2, shards)]


@stack
def test_workers_partition_the_dataset(settings, world: Path) -> None:
    report = build_dataset(settings, spec_for(world, num_shards=5), use_ray=False)
    assignment = [shards_for_worker(5, rank, 2) for rank in range(2)]
    assert sorted(assignment[0] + assignment[1]) == list(range(5))  # each shard exactly once
    by_shard = [lines(settings, report.dataset_id, [i]) for i in range(5)]
    per_rank = [lines(settings, report.dataset_id, shards) for shards in assignment]
    for rank, shards in enumerate(assignment):
        assert per_rank[rank] == [line for i in shards for line in by_shard[i]]
    everything = lines(settings, report.dataset_id)
    assert len(per_rank[0]) + len(per_rank[1]) == len(everything) == 300
    assert Counter(per_rank[0]) + Counter(per_rank[1]) == Counter(everything)
    with pytest.raises(DatasetError, match="no shard"):
        iter_samples(settings, report.dataset_id, 2, shards=[5])


@stack
def test_images_resolve_through_object_storage(settings, world: Path, tmp_path: Path) -> None:
    wid = upload_world(settings, world)
    assert wid == world_id(world) == upload_world(settings, world)  # idempotent
    report = build_dataset(settings, spec_for(world, stage=3, num_samples=30), use_ray=False)
    assert report.world_id == wid
    sample = next(iter_samples(settings, report.dataset_id, 3))

    remote = ImageResolver(settings, wid, local_root=tmp_path / "absent", cache_dir=tmp_path)
    for rel in sample.images:
        path = remote(rel)
        assert path.is_relative_to(tmp_path) and path.read_bytes() == (world / rel).read_bytes()
    ObjectStore(settings.s3).delete(f"worlds/{wid}/{sample.images[0]}")
    assert remote(sample.images[0]).is_file()  # served from the cache now
    local = ImageResolver(settings, wid, local_root=world, cache_dir=tmp_path / "unused")
    assert local(sample.images[1]) == world / sample.images[1]
    with pytest.raises(WorldError, match="upload_world"):
        ImageResolver(settings, "0" * 16, cache_dir=tmp_path)(sample.images[0])


@stack
def test_a_worker_without_the_world_builds_the_same_shard(
    settings, world: Path, tmp_path: Path
) -> None:
    spec = spec_for(world, stage=3, num_samples=40, num_shards=2)
    build_dataset(settings, spec, use_ray=False)  # also stores the annotations
    wid = world_id(world)
    cached = annotated_root(settings, tmp_path / "absent", wid, tmp_path / "cache")
    assert cached == tmp_path / "cache" / wid
    assert encode_samples(shard_samples(spec, 1, cached)) == shard_bytes(
        settings, spec.dataset_id(), 3
    )[1]
