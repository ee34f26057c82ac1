"""Real people (CUHK03 camera pair 1, read from ``../shared`` at run time; nothing of it is
stored in the project): the reader, the ``cuhk03_pair1`` benchmark task through the eval
engine, and real images in the instruction data engine's identity-only tasks. Layout errors
use fake layouts of generated images in ``tmp_path``."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chatreid.data import DATASETS, DatasetLayoutError, InstructionDatasetSpec, WorldError
from chatreid.data.build import shard_samples
from chatreid.data.datasets import CUHK03Pair1
from chatreid.data.datasets.cuhk03_pair1 import VAL_PID_OFFSET
from chatreid.data.instructions import REAL_TASKS, RealImages, parse_stage2, parse_stage3
from chatreid.data.worlds import ImageResolver, is_real, resolve_real
from chatreid.evaluation import BENCHMARKS, EvalConfig
from chatreid.evaluation.runner import evaluate_task

from .conftest import SHARED as SHARED_ROOT

SHARED = SHARED_ROOT / "data"
REAL = SHARED / "cuhk03-pair1"
needs_real = pytest.mark.shared("data/cuhk03-pair1")
_NAME = re.compile(r"(\d{4})_(\d{2})\.jpg$")


def fake_layout(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    """``cuhk03-pair1/`` under ``root`` with tiny generated images (no real people)."""
    folder = root / "cuhk03-pair1"
    for split, names in (("train", train), ("val", val)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for name, shade in names.items():
            Image.new("RGB", (6, 16), (shade, 40, 200 - shade)).save(folder / split / name)
    return folder


def small_layout(root: Path) -> Path:
    names = {f"{p:04d}_{k:02d}.jpg": 20 * p + k for p in range(3) for k in (0, 1, 5, 6)}
    return fake_layout(root, names, dict(list(names.items())[:8]))


def person(path: str) -> str:
    """The real person of an image path: the file name's ``NNNN``."""
    m = _NAME.search(path)
    assert m is not None, path
    return m.group(1)


def camera(path: str) -> int:
    return int(int(_NAME.search(path).group(2)) >= 5)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- the reader


@needs_real
def test_reader_parses_the_real_layout() -> None:
    ds = CUHK03Pair1(SHARED)  # a parent holding cuhk03-pair1/
    assert ds.dataset_dir == REAL
    assert len(ds.train) == 7239 and ds.num_train_pids == 743
    assert {r.camid for r in ds.train} == {0, 1}
    val = ds.query + ds.gallery
    assert len(val) == 938 and len({r.pid for r in val}) == 100
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
    # train and val are numbered separately: val pids are offset, never shared with train
    assert min(r.pid for r in val) >= VAL_PID_OFFSET
    assert not {r.pid for r in ds.train} & {r.pid for r in val}
    for r in ds.train[:50] + ds.query[:50]:
        assert r.pid % VAL_PID_OFFSET == int(person(r.path.name))
        assert r.camid == camera(r.path.name)

    b2a = CUHK03Pair1(REAL, direction="b2a")  # the folder itself
    assert b2a.query == ds.gallery and b2a.gallery == ds.query and b2a.train == ds.train
    assert DATASETS["cuhk03_pair1"] is CUHK03Pair1


def test_reader_on_a_fake_layout(tmp_path: Path) -> None:
    folder = small_layout(tmp_path)
    ds = CUHK03Pair1(tmp_path)
    assert ds.dataset_dir == folder and len(ds.train) == 12 and ds.num_train_pids == 3
    assert [(r.pid, r.camid) for r in ds.query] == [(VAL_PID_OFFSET, 0)] * 2 + [
        (VAL_PID_OFFSET + 1, 0)] * 2
    with pytest.raises(ValueError, match="a2b"):
        CUHK03Pair1(tmp_path, direction="c2d")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0001_10.jpg", "1_05.jpg", "0001-05.jpg", "abcd_01.png"])
def test_bad_file_names_are_named(tmp_path: Path, bad: str) -> None:
    folder = small_layout(tmp_path)
    Image.new("RGB", (4, 4)).save(folder / "val" / bad)
    with pytest.raises(DatasetLayoutError, match=re.escape(bad)):
        CUHK03Pair1(tmp_path)


def test_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="missing dataset folder"):
        CUHK03Pair1(tmp_path / "absent")
    folder = fake_layout(tmp_path, {"0000_00.jpg": 1}, {})
    (folder / "val").rmdir()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(folder / "val"))):
        CUHK03Pair1(tmp_path)


# ----------------------------------------------------------------------------- evaluation


def colour_embed(images: list[Image.Image]) -> np.ndarray:
    """A cheap, deterministic embedder: colour histograms of six horizontal stripes."""
    out = []
    for im in images:
        a = np.asarray(im.resize((32, 96)), dtype=np.int64) // 64
        codes = a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]
        rows = [np.bincount(s.ravel(), minlength=64) for s in np.array_split(codes, 6, axis=0)]
        v = np.sqrt(np.concatenate(rows).astype(np.float32))
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def test_the_benchmark_task_averages_both_directions() -> None:
    task = BENCHMARKS["cuhk03_pair1"]
    assert (task.dataset, task.protocol, task.kind) == ("cuhk03_pair1", "market1501", "standard")
    assert task.trials == ({"direction": "a2b"}, {"direction": "b2a"})


@needs_real
def test_eval_engine_scores_the_real_task() -> None:
    result = evaluate_task(BENCHMARKS["cuhk03_pair1"], SHARED, colour_embed, None, EvalConfig())
    summary = result.baseline.summary()
    assert result.runs == 2 and result.queries == 938  # A -> B and B -> A
    assert 0.04 < summary["mAP"] < 1 and 0 <= summary["rank1"] <= 1  # chance is ~0.02


@needs_real
@pytest.mark.slow
def test_imagenet_embedder_on_real_a_to_b() -> None:
    from chatreid.embedder import build_embedder

    task = dataclasses.replace(BENCHMARKS["cuhk03_pair1"], trials=({"direction": "a2b"},))
    result = evaluate_task(task, SHARED, build_embedder().embed, None, EvalConfig())
    summary = result.baseline.summary()
    assert result.queries == 451
    assert 0.04 < summary["mAP"] < 0.2 and 0 <= summary["rank1"] <= 1  # measured: 7.8 mAP


# ----------------------------------------------------------------------------- instruction data


def real_spec(world: Path, stage: int, **real: object) -> InstructionDatasetSpec:
    return InstructionDatasetSpec(world_root=world, stage=stage, num_samples=120, seed=3,
                                  real=RealImages(**{"root": SHARED, **real}))


def check_identity_answer(task: str, images: list[str], sample) -> None:
    """The answer agrees with the real people named by the file names."""
    pids = [person(p) for p in images]
    if task == "ii_one_to_one":
        assert parse_stage2(task, sample.response)["match"] == (pids[0] == pids[1])
    elif task == "ii_many_to_many":
        same = [i for i, p in enumerate(pids[1:], 1) if p == pids[0]]
        assert parse_stage2(task, sample.response)["indices"] == same
    else:  # stage-3 standard: one cross-camera match
        choice = parse_stage3(sample.response)["choice"]
        assert [i for i, p in enumerate(pids[1:], 1) if p == pids[0]] == [choice]
        assert camera(images[choice]) != camera(images[0])


@needs_real
@pytest.mark.parametrize("stage", [2, 3])
def test_identity_tasks_draw_real_people(world: Path, stage: int) -> None:
    spec = real_spec(world, stage, share=0.6)
    samples = shard_samples(spec, 0, world)
    real = [s for s in samples if s.meta.get("source") == "cuhk03_pair1"]
    assert real and {s.task for s in real} <= set(REAL_TASKS[stage])
    for s in samples:
        flags = {is_real(p) for p in s.images}
        assert flags == {s in real}  # a sample is all real or all synthetic
        if s.task not in REAL_TASKS[stage]:
            assert s not in real  # attribute, caption, outfit, modality tasks: synthetic only
    by_task = Counter(s.task for s in real)
    assert set(by_task) == set(REAL_TASKS[stage])
    for s in real:
        files = [resolve_real(p, SHARED) for p in s.images]
        assert all(f.is_file() and f.parent.name == "train" for f in files)  # never val people
        check_identity_answer(s.task, [f.name for f in files], s)
    # real off: the same spec builds exactly what it built before real images existed
    off = spec.model_copy(update={"real": None})
    assert not any(is_real(p) for s in shard_samples(off, 0, world) for p in s.images)


@needs_real
def test_dataset_id_covers_the_real_set(world: Path, tmp_path: Path) -> None:
    on = real_spec(world, 3)
    off = on.model_copy(update={"real": None})
    assert len({off.dataset_id(), on.dataset_id(), real_spec(world, 3, share=0.3).dataset_id()
                }) == 3
    with pytest.raises(ValueError, match="stage 1"):
        real_spec(world, 1)
    with pytest.raises(ValueError, match="held-out"):
        InstructionDatasetSpec(world_root=world, stage=3, num_samples=5, splits=("test",),
                               real=RealImages(root=SHARED))

    # the id hashes the file list: another place, same files = same id; one more file = new id
    a, b = small_layout(tmp_path / "a"), small_layout(tmp_path / "b")

    def fake(root: Path) -> InstructionDatasetSpec:
        return on.model_copy(update={"real": RealImages(root=root)})

    assert fake(a).dataset_id() == fake(b).dataset_id()
    Image.new("RGB", (6, 16)).save(b / "train" / "0009_07.jpg")
    assert fake(tmp_path / "b").dataset_id() != fake(a).dataset_id()


def test_real_paths_resolve_only_under_the_real_root(tmp_path: Path) -> None:
    folder = small_layout(tmp_path)
    assert resolve_real("real:cuhk03_pair1/train/0001_05.jpg", tmp_path) == (
        folder / "train" / "0001_05.jpg")
    for bad, why in [("real:cuhk03_pair1/../x.jpg", "world-relative"),
                     ("real:nope/train/0001_05.jpg", "not a real image path"),
                     ("real:cuhk03_pair1/train/0099_05.jpg", "no such real image")]:
        with pytest.raises(WorldError, match=why):
            resolve_real(bad, tmp_path)
    with pytest.raises(WorldError, match="real_root"):
        resolve_real("real:cuhk03_pair1/train/0001_05.jpg", None)
    with pytest.raises(WorldError, match="missing"):
        resolve_real("real:cuhk03_pair1/train/0001_05.jpg", tmp_path / "absent")


@pytest.mark.stack
def test_training_workers_resolve_real_paths(stack_base, tmp_path: Path) -> None:
    """What ``ray_jobs/hpt.py``'s loader calls: real paths read from the real folder (the
    ``train.real_root`` setting by default), never fetched from the bucket."""
    folder = small_layout(tmp_path)
    settings = stack_base.model_copy(deep=True)
    settings.train.real_root = tmp_path
    resolver = ImageResolver(settings, "0" * 16, cache_dir=tmp_path / "cache")
    assert resolver("real:cuhk03_pair1/val/0000_05.jpg") == folder / "val" / "0000_05.jpg"
    explicit = ImageResolver(settings, "0" * 16, real_root=folder)
    assert explicit.read_bytes("real:cuhk03_pair1/train/0002_06.jpg") == (
        folder / "train" / "0002_06.jpg").read_bytes()


@needs_real
@pytest.mark.stack
def test_a_built_dataset_with_real_people_trains_from_the_real_folder(settings, world) -> None:
    """Built into the bucket and read back as a training worker does: the manifest keeps the
    real option, no real image is uploaded, every image resolves."""
    from chatreid.data import build_dataset, iter_samples, load_manifest, upload_world
    from chatreid.storage import ObjectStore

    spec = InstructionDatasetSpec(world_root=world, stage=3, num_samples=40, num_shards=2,
                                  real=RealImages(root=SHARED, share=0.8))
    report = build_dataset(settings, spec, use_ray=False)
    assert load_manifest(settings, report.dataset_id, 3).spec == spec
    assert build_dataset(settings, spec, use_ray=False).reused
    wid = upload_world(settings, world)
    assert not any("cuhk03" in key for key in ObjectStore(settings.s3).list(""))  # nothing real
    resolver = ImageResolver(settings, wid, local_root=world, real_root=SHARED)
    samples = list(iter_samples(settings, report.dataset_id, 3))
    assert any(s.meta.get("source") for s in samples)
    assert all(resolver(p).is_file() for s in samples for p in s.images)
