"""Fine-tuning the prefilter embedder on real images: sources, frozen ONNX starts, distillation.

Real images and weights are read from ``../shared`` at run time; the subset used here is a
folder of symlinks in a temporary directory (nothing is copied into the project).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.checkpoints import pull
from chatreid.embedder import CARD_FILE, HEAD_FILE, ONNX_FILE, load_embedder
from chatreid.tuning.embedder_training import (
    HISTORY_FILE,
    EmbedderTrainConfig,
    IdentityDataset,
    evaluate_real,
    identity_head,
    relational_distill_loss,
    shared_features,
    train_images,
    train_split_hash,
)

from .conftest import SHARED

REAL = SHARED / "data" / "cuhk03-pair1"
OSNET = SHARED / "weights" / "osnet_x0_25_msmt17.onnx"
needs_real = pytest.mark.shared("data/cuhk03-pair1", "weights/osnet_x0_25_msmt17.onnx")


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 train and 20 validation people of CUHK03 pair 1, as symlinks."""
    root = tmp_path_factory.mktemp("real") / "cuhk03-pair1"
    for split, people in (("train", 40), ("val", 20)):
        (root / split).mkdir(parents=True)
        for src in sorted((REAL / split).glob("*.jpg")):
            if int(src.stem[:4]) < people:
                (root / split / src.name).symlink_to(src)
    return root


@needs_real
def test_sources_keep_their_people_apart(world: Path, real_subset: Path) -> None:
    images = train_images(world, real_subset)
    synthetic = [i for i in images if i.identity.startswith("synthetic/")]
    real = [i for i in images if i.identity.startswith("real/")]
    assert synthetic and len(real) == len(list((real_subset / "train").iterdir()))
    ds = IdentityDataset(images, 64, 32, decode=False)
    # real person 3 and synthetic person 3 are two classes, not one
    assert ds.num_classes == len({i.identity for i in synthetic}) + 40
    assert train_split_hash(world, real_subset) != train_split_hash(world)
    with pytest.raises(ValueError, match=r"world_root .*real_root"):
        EmbedderTrainConfig()


def test_relational_distillation_compares_similarity_structure_not_dimensions() -> None:
    rng = torch.Generator().manual_seed(0)  # unseeded, the suite's RNG state decided the margin
    teacher = torch.randn(8, 512, generator=rng)
    student = torch.cat([teacher, teacher], dim=1) * 3.0  # another size and scale, same geometry
    assert relational_distill_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert relational_distill_loss(torch.randn(8, 64, generator=rng), teacher).item() > 0.01


def test_an_identity_head_starts_where_the_frozen_features_are() -> None:
    x = torch.randn(16, 32)
    head = identity_head(32).eval()
    torch.testing.assert_close(head.proj(x), x)


@needs_real
def test_shared_features_hold_each_image_and_its_mirror(real_subset: Path) -> None:
    paths = sorted((real_subset / "val").glob("*.jpg"))[:5]
    emb = load_embedder(OSNET)
    table = shared_features(emb.features, paths, rank=0, world_size=1)
    assert tuple(table.shape) == (2, 5, 512)
    img = Image.open(paths[2]).convert("RGB")
    np.testing.assert_allclose(table[0, 2].numpy(), emb.features([img])[0], atol=1e-5)
    mirrored = emb.features([img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])[0]
    np.testing.assert_allclose(table[1, 2].numpy(), mirrored, atol=1e-5)


@needs_real
@pytest.mark.stack
def test_a_head_fine_tuned_on_a_frozen_onnx_start_is_pushed_and_served(
        settings, real_subset, ray_session, tmp_path) -> None:
    from ray_jobs.train_embedder import train_embedder

    cfg = EmbedderTrainConfig(real_root=real_subset, start=str(OSNET), epochs=2,
                              steps_per_epoch=6, p=8, k=4, warmup_steps=2)
    event = train_embedder(settings, cfg)
    m = event.metrics
    # before: exactly the imported model's figure on the real validation people
    start = evaluate_real(load_embedder(OSNET), real_subset)
    assert m["baseline_real/mAP"] == pytest.approx(start["mAP"], abs=1e-9)
    assert m["baseline_mAP"] == pytest.approx(start["mAP"], abs=1e-9)  # the only part
    # after: the served checkpoint is the graph, its card and the trained head
    pull(settings, event, tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == sorted([CARD_FILE, HEAD_FILE, HISTORY_FILE, ONNX_FILE, "manifest.json"])
    served = load_embedder(tmp_path / "ckpt")
    assert served.version == event.version and served.version.startswith("onnx-osnet")
    assert served.dim == 512 and served.head is not None
    again = evaluate_real(served, real_subset)
    assert again["mAP"] == pytest.approx(m["real/mAP"], abs=1e-6)
    assert m["real/mAP"] != pytest.approx(start["mAP"], abs=1e-6)  # the head did learn
    assert m["loss"] < m["first_loss"]


@needs_real
@pytest.mark.stack
@pytest.mark.slow
def test_a_torch_student_distils_from_an_onnx_teacher_on_real_and_synthetic_people(
        settings, world, real_subset, ray_session, tmp_path) -> None:
    from ray_jobs.train_embedder import train_embedder

    cfg = EmbedderTrainConfig(world_root=world, real_root=real_subset, teacher=str(OSNET),
                              epochs=2, steps_per_epoch=4, p=8, k=4, warmup_steps=2,
                              height=128, width=64)
    event = train_embedder(settings, cfg)
    m = event.metrics
    history = pull(settings, event, tmp_path / "ckpt")["files"]
    assert sorted(f["path"] for f in history) == ["embedder.pt", HISTORY_FILE]
    served = load_embedder(tmp_path / "ckpt")
    assert served.version == event.version and served.dim == 1280
    # both parts scored before and after; the distillation loss was part of training
    for part in ("synthetic", "real"):
        assert 0 < m[f"baseline_{part}/mAP"] < 1 and 0 < m[f"{part}/mAP"] < 1
    assert m["mAP"] == pytest.approx((m["synthetic/mAP"] + m["real/mAP"]) / 2)
    epochs = json.loads((tmp_path / "ckpt" / HISTORY_FILE).read_text())
    assert all(e["distill"] > 0 for e in epochs)
