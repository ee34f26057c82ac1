"""The instruction data engine: sharded, seeded builds of the three stages into object storage.

A spec (world, stage, size, seed, shards, builder config) names a dataset by content: its id
hashes the world's annotations with everything else, so the same spec is the same dataset on any
machine. Shard ``i`` builds its even share of the samples with a seed spawned from ``(seed, i)``,
so its bytes do not depend on which worker runs it or when. The layout in the bucket::

    instructions/<dataset_id>/stage<k>/part-00000.jsonl   one sample per line, sorted keys
    instructions/<dataset_id>/stage<k>/manifest.json      spec, shards with count and sha256
    instructions/<dataset_id>/stage<k>/stats.json         the report, written last

Readers stream shards and verify each against the manifest; ``shards_for_worker`` splits the
shards among training workers. Images are world-relative paths (see ``chatreid.data.worlds``).

``real`` (off by default, so existing ids are unchanged) lets the identity-only tasks draw real
people at a share (``chatreid.data.instructions.real``; attribute, caption, outfit and modality
tasks stay synthetic-only); the id then also hashes the real set's file list and the share.
Real images are named ``real:<dataset>/...`` and read from the real folder on every machine.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from chatreid.config import Settings
from chatreid.data.instructions import (
    TRAIN_SPLITS,
    CaptionFilter,
    InstructionSample,
    RealImages,
    Stage2Config,
    Stage3Config,
    build_stage1,
    build_stage2,
    build_stage3,
)
from chatreid.data.report import DatasetReport, ShardStats
from chatreid.data.worlds import (
    ANNOTATIONS,
    DEFAULT_CACHE,
    annotated_root,
    real_dataset_dir,
    relativize,
    world_id,
    world_prefix,
)
from chatreid.storage import ObjectNotFound, ObjectStore, sha256_hex

# Bump when a builder's output changes for the same spec: the dataset ids change with it, so an
# old build is never mistaken for a new one. 2: stage-3 text samples carry their clue (meta).
FORMAT = 2
# The builder config of each stage; a spec's ``overrides`` set its fields.
STAGE_CONFIGS: dict[int, type] = {1: CaptionFilter, 2: Stage2Config, 3: Stage3Config}


class DatasetError(ValueError):
    """An instruction dataset that is unknown, incomplete or inconsistent with its manifest."""


class CorruptShardError(DatasetError):
    """A shard whose bytes do not match the sha256 in the manifest."""


def _check_keys(cls: type, overrides: dict[str, Any], where: str) -> None:
    """Pydantic ignores unknown dataclass fields; a misspelt override must not pass silently."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown {where} field {key!r}; known: {sorted(known)}")
        if is_dataclass(hints[key]) and isinstance(value, dict):
            _check_keys(hints[key], value, f"{where}.{key}")


class InstructionDatasetSpec(BaseModel):
    """What to build. ``overrides`` sets fields of the stage's builder config: ``CaptionFilter``
    (stage 1), ``Stage2Config`` or ``Stage3Config``, e.g. ``{"gallery_size": [3, 6]}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    world_root: Path
    stage: Literal[1, 2, 3]
    num_samples: int = Field(gt=0)
    seed: int = Field(0, ge=0)
    num_shards: int = Field(1, gt=0)
    splits: tuple[str, ...] = TRAIN_SPLITS
    overrides: dict[str, Any] = Field(default_factory=dict)
    real: RealImages | None = None  # real people in identity-only tasks (stages 2 and 3)

    @field_validator("world_root")
    @classmethod
    def _absolute(cls, root: Path) -> Path:
        return root.expanduser().absolute()  # Ray workers need not share the driver's cwd

    @model_validator(mode="after")
    def _consistent(self) -> InstructionDatasetSpec:
        if self.num_shards > self.num_samples:
            raise ValueError(
                f"{self.num_shards} shards for {self.num_samples} samples: a shard would be empty"
            )
        self.builder_config()  # fail at the spec, not in a worker
        if self.real is not None and self.stage == 1:
            raise ValueError("stage 1 is attribute captioning: it has no identity-only tasks "
                             "for real images")
        if self.real is not None and "test" in self.splits:
            raise ValueError("real images come from the real training split: a spec of "
                             "held-out (test) identities stays synthetic")
        return self

    def builder_config(self) -> Any:
        cls = STAGE_CONFIGS[self.stage]
        _check_keys(cls, self.overrides, cls.__name__)
        return TypeAdapter(cls).validate_python(self.overrides)

    def builder_config_json(self) -> dict[str, Any]:
        """The full config, defaults included: a changed default is a different dataset."""
        cls = STAGE_CONFIGS[self.stage]
        return TypeAdapter(cls).dump_python(self.builder_config(), mode="json")

    def shard_counts(self) -> list[int]:
        """Even split; the first ``num_samples % num_shards`` shards take one more."""
        base, extra = divmod(self.num_samples, self.num_shards)
        return [base + (i < extra) for i in range(self.num_shards)]

    def shard_seeds(self) -> list[int]:
        """Independent streams per shard, spawned from the one seed."""
        children = np.random.SeedSequence(self.seed).spawn(self.num_shards)
        return [int(c.generate_state(1, dtype=np.uint64)[0]) for c in children]

    def dataset_id(self, wid: str | None = None) -> str:
        identity = {
            "format": FORMAT,
            "world": wid or world_id(self.world_root),
            "stage": self.stage,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "num_shards": self.num_shards,
            "splits": list(self.splits),
            "config": self.builder_config_json(),
        }
        if self.real is not None:  # absent when off: ids of synthetic-only specs stay as they were
            identity["real"] = self.real.identity()
        return sha256_hex(json.dumps(identity, sort_keys=True).encode())[:16]


class ShardInfo(BaseModel):
    index: int
    key: str
    count: int
    sha256: str
    size: int


class DatasetManifest(BaseModel):
    format: int
    dataset_id: str
    world_id: str
    stage: int
    num_samples: int
    spec: InstructionDatasetSpec
    builder_config: dict[str, Any]
    shards: list[ShardInfo]


def dataset_prefix(dataset_id: str, stage: int) -> str:
    return f"instructions/{dataset_id}/stage{stage}"


def shard_key(dataset_id: str, stage: int, index: int) -> str:
    return f"{dataset_prefix(dataset_id, stage)}/part-{index:05d}.jsonl"


def manifest_key(dataset_id: str, stage: int) -> str:
    return f"{dataset_prefix(dataset_id, stage)}/manifest.json"


def stats_key(dataset_id: str, stage: int) -> str:
    return f"{dataset_prefix(dataset_id, stage)}/stats.json"


# ----------------------------------------------------------------------------- one shard


def encode_samples(samples: Iterable[InstructionSample]) -> bytes:
    lines = (json.dumps(s.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
             for s in samples)
    return "".join(line + "\n" for line in lines).encode()


def decode_samples(data: bytes) -> Iterator[InstructionSample]:
    for line in data.decode().splitlines():
        if line:
            yield InstructionSample.model_validate_json(line)


def shard_samples(spec: InstructionDatasetSpec, index: int, root: Path) -> list[InstructionSample]:
    """Shard ``index``'s samples from the annotations under ``root``, images made relative."""
    seed, n = spec.shard_seeds()[index], spec.shard_counts()[index]
    config = spec.builder_config()
    if spec.stage == 1:
        built = build_stage1(root, seed=seed, n=n, caption_filter=config, splits=spec.splits)
    elif spec.stage == 2:
        built = build_stage2(root, seed=seed, n=n, config=config, splits=spec.splits,
                             real=spec.real)
    else:
        built = build_stage3(root, seed=seed, n=n, config=config, splits=spec.splits,
                             real=spec.real)
    real = None
    if spec.real is not None:
        real = (spec.real.dataset, real_dataset_dir(spec.real.dataset, spec.real.root))
    return [s.model_copy(update={"images": [relativize(root, p, real) for p in s.images]})
            for s in built]


def build_shard(
    settings: Settings,
    spec: InstructionDatasetSpec,
    index: int,
    *,
    dataset_id: str,
    wid: str,
    cache_dir: Path = DEFAULT_CACHE,
) -> tuple[ShardInfo, ShardStats]:
    """Build, write and count one shard: the unit of work a Ray task (or the driver) runs."""
    root = annotated_root(settings, spec.world_root, wid, cache_dir)
    samples = shard_samples(spec, index, root)
    data = encode_samples(samples)
    key = shard_key(dataset_id, spec.stage, index)
    ObjectStore(settings.s3).put(key, data, "application/x-ndjson")
    stats = ShardStats()
    for s in samples:
        stats.add(s)
    info = ShardInfo(index=index, key=key, count=len(samples), sha256=sha256_hex(data),
                     size=len(data))
    return info, stats


def _ray_shard(row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    # JSON strings cross the Ray boundary: the stats' nested dicts differ per shard, which
    # Arrow's per-block schema inference would reject.
    info, stats = build_shard(kwargs.pop("settings"), kwargs.pop("spec"), int(row["id"]), **kwargs)
    return {"index": info.index, "info": info.model_dump_json(), "stats": stats.model_dump_json()}


def _run_shards(
    settings: Settings, spec: InstructionDatasetSpec, use_ray: bool, **kwargs: Any
) -> list[tuple[ShardInfo, ShardStats]]:
    if not use_ray:
        return [build_shard(settings, spec, i, **kwargs) for i in range(spec.num_shards)]
    import ray.data  # heavy; only builds that use it pay for the import

    from chatreid.cluster import connect

    connect(settings)  # the configured cluster, never an ad-hoc one with other auth settings
    ray.data.DataContext.get_current().print_on_execution_start = False  # a page of config

    ds = ray.data.range(spec.num_shards, override_num_blocks=spec.num_shards)
    rows = ds.map(_ray_shard, fn_kwargs={"settings": settings, "spec": spec, **kwargs},
                  num_cpus=1).take_all()
    results = [
        (ShardInfo.model_validate_json(r["info"]), ShardStats.model_validate_json(r["stats"]))
        for r in rows
    ]
    return sorted(results, key=lambda r: r[0].index)


# ----------------------------------------------------------------------------- the dataset


def _upload_annotations(store: ObjectStore, root: Path, wid: str) -> None:
    """Workers without the world read its annotations from the bucket (two small files)."""
    for rel in ANNOTATIONS:
        key = f"{world_prefix(wid)}/{rel}"
        if not store.exists(key):
            store.put(key, (root / rel).read_bytes(), "application/json")


def _existing_report(settings: Settings, dataset_id: str, stage: int) -> DatasetReport | None:
    """The stored report of a complete build whose shards all verify, else None."""
    try:
        manifest = load_manifest(settings, dataset_id, stage)
        verify(settings, manifest)
        report = load_report(settings, dataset_id, stage)
    except DatasetError:
        return None
    return report.model_copy(update={"reused": True})


def build_dataset(
    settings: Settings,
    spec: InstructionDatasetSpec,
    *,
    use_ray: bool = True,
    force: bool = False,
    cache_dir: Path = DEFAULT_CACHE,
) -> DatasetReport:
    """Build the dataset ``spec`` names into object storage and return its stats report.

    With ``use_ray`` each shard is a Ray Data task (Ray starts in-process unless connected);
    without, the driver runs the same function, so the bytes are the same. The world's
    annotations go to the bucket first, for workers that lack the world. A complete, verified
    build is reused unless ``force``.
    """
    wid = world_id(spec.world_root)
    dataset_id = spec.dataset_id(wid)
    store = ObjectStore(settings.s3)
    store.ensure_bucket()
    if not force and (done := _existing_report(settings, dataset_id, spec.stage)):
        return done
    _upload_annotations(store, Path(spec.world_root), wid)
    results = _run_shards(settings, spec, use_ray, dataset_id=dataset_id, wid=wid,
                          cache_dir=cache_dir)
    manifest = DatasetManifest(
        format=FORMAT,
        dataset_id=dataset_id,
        world_id=wid,
        stage=spec.stage,
        num_samples=sum(info.count for info, _ in results),
        spec=spec,
        builder_config=spec.builder_config_json(),
        shards=[info for info, _ in results],
    )
    stats = ShardStats()
    for _, shard in results:
        stats = stats.merge(shard)
    report = DatasetReport.from_stats(stats, dataset_id=dataset_id, world_id=wid,
                                      stage=spec.stage, num_shards=spec.num_shards)
    # Manifest after the shards and stats last: a reader that finds stats finds a whole dataset.
    store.put(manifest_key(dataset_id, spec.stage), manifest.model_dump_json(indent=1).encode(),
              "application/json")
    store.put(stats_key(dataset_id, spec.stage), report.model_dump_json(indent=1).encode(),
              "application/json")
    return report


# ----------------------------------------------------------------------------- reading


def _get(store: ObjectStore, key: str, what: str) -> bytes:
    try:
        return store.get(key)
    except ObjectNotFound:
        raise DatasetError(f"{what}: no {key} in bucket {store.bucket!r}") from None


def load_manifest(settings: Settings, dataset_id: str, stage: int) -> DatasetManifest:
    store = ObjectStore(settings.s3)
    what = f"unknown instruction dataset {dataset_id!r} (stage {stage})"
    return DatasetManifest.model_validate_json(_get(store, manifest_key(dataset_id, stage), what))


def load_report(settings: Settings, dataset_id: str, stage: int) -> DatasetReport:
    store = ObjectStore(settings.s3)
    what = f"instruction dataset {dataset_id!r} (stage {stage}) has no stats report"
    return DatasetReport.model_validate_json(_get(store, stats_key(dataset_id, stage), what))


def _read_shard(store: ObjectStore, manifest: DatasetManifest, info: ShardInfo) -> bytes:
    data = _get(store, info.key, f"shard {info.key} of dataset {manifest.dataset_id} is missing")
    digest = sha256_hex(data)
    if digest != info.sha256:
        raise CorruptShardError(
            f"shard {info.key} is corrupt: sha256 {digest[:12]}… does not match the manifest's "
            f"{info.sha256[:12]}…"
        )
    return data


def verify(settings: Settings, manifest: DatasetManifest) -> None:
    """Every shard is present and matches its sha256 (raises ``CorruptShardError`` if not)."""
    store = ObjectStore(settings.s3)
    for info in manifest.shards:
        _read_shard(store, manifest, info)


def shards_for_worker(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: rank ``r`` of ``w`` reads shards ``r, r + w, ...``; together all, once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} workers")
    if num_shards < world_size:
        raise ValueError(
            f"{num_shards} shards for {world_size} workers: some would get no data "
            "(build with at least one shard per worker)"
        )
    return list(range(rank, num_shards, world_size))


def _stream(
    store: ObjectStore, manifest: DatasetManifest, shards: list[ShardInfo]
) -> Iterator[InstructionSample]:
    for info in shards:
        yield from decode_samples(_read_shard(store, manifest, info))


def iter_samples(
    settings: Settings, dataset_id: str, stage: int, shards: Sequence[int] | None = None
) -> Iterator[InstructionSample]:
    """Stream the samples of ``shards`` (default: all), one verified shard in memory at a time.

    The manifest is read now, so an unknown dataset or shard fails here, not at the first sample.
    """
    manifest = load_manifest(settings, dataset_id, stage)
    indices = range(len(manifest.shards)) if shards is None else shards
    unknown = [i for i in indices if not 0 <= i < len(manifest.shards)]
    if unknown:
        raise DatasetError(
            f"dataset {dataset_id} has {len(manifest.shards)} shards; no shard {unknown}"
        )
    selected = [manifest.shards[i] for i in indices]
    return _stream(ObjectStore(settings.s3), manifest, selected)
