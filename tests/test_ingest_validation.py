import io
import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from PIL import Image
from pydantic import ValidationError

from chatreid.config import IngestorSettings
from schemas import CropEvent
from services.ingestor import CropRejected, validate_crop, validate_metadata

from .conftest import jpeg_bytes

LIMITS = IngestorSettings()
_EVENT = dict(crop_id="x1", site="s", capture_time=datetime(2026, 1, 1, tzinfo=UTC),
              object_key="crops/ab/x.jpg", sha256="ab" * 32, width=64, height=128)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions: the classic decompression bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")


def test_valid_rgb_and_infrared_crops_pass():
    ok = validate_crop(jpeg_bytes(), LIMITS)
    assert (ok.format, ok.width, ok.height, ok.ext) == ("JPEG", 64, 128, "jpg")
    ir = validate_crop(jpeg_bytes(mode="L"), LIMITS)
    assert ir.mode == "L"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "image.empty"),
        (b"definitely not an image", "image.corrupt"),
        (jpeg_bytes()[:200], "image.corrupt"),  # truncated JPEG
        (png_header_only(60_000, 60_000), "image.bomb"),
        (jpeg_bytes(size=(8, 8)), "image.too_small"),
    ],
)
def test_bad_crops_are_rejected_with_a_reason(data, error):
    with pytest.raises(CropRejected) as info:
        validate_crop(data, LIMITS)
    assert info.value.error == error
    assert info.value.reason


def test_oversized_payload_is_refused_before_decoding():
    limits = IngestorSettings(max_bytes=100)
    with pytest.raises(CropRejected, match="exceeds the limit of 100"):
        validate_crop(jpeg_bytes(), limits)


def test_unsupported_format_is_named():
    buf = io.BytesIO()
    Image.new("RGB", (64, 128)).save(buf, "GIF")
    with pytest.raises(CropRejected, match="format GIF"):
        validate_crop(buf.getvalue(), LIMITS)


# -- metadata: camera ids and capture times --------------------------------------------------
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BAD_CAMERAS = ["", "c\x01", "cam\n1", "c1\n", "\x1b[2Jc1", "x" * 129, "a/b", "a\\b", "..",
               "../etc", " c1", "c1 ", "a  b", "cam\u200b1"]


@pytest.mark.parametrize("camera", BAD_CAMERAS)
def test_junk_camera_ids_are_refused_by_the_ingestor_and_the_contract(camera) -> None:
    with pytest.raises(CropRejected) as info:
        validate_metadata(camera, NOW, LIMITS, now=NOW)
    assert info.value.error == "camera.invalid"
    with pytest.raises(ValidationError, match="camera"):
        CropEvent(camera=camera, **_EVENT)


@pytest.mark.parametrize("camera", ["c1", "cam_03", "Entrée Nord", "gate-2.east", "lobby:4",
                                    "x" * 128])
def test_ordinary_camera_ids_pass(camera) -> None:
    assert validate_metadata(camera, NOW, LIMITS, now=NOW) == NOW
    assert CropEvent(camera=camera, **_EVENT).camera == camera


def test_capture_times_are_bounded_and_naive_means_utc() -> None:
    skew = timedelta(seconds=LIMITS.max_future_skew_s)
    assert validate_metadata("c1", NOW + skew, LIMITS, now=NOW) == NOW + skew
    assert validate_metadata("c1", datetime(1970, 1, 1), LIMITS, now=NOW) == datetime(
        1970, 1, 1, tzinfo=UTC)
    assert validate_metadata("c1", datetime(2026, 12, 1, 12), LIMITS, now=NOW) == NOW
    plus2 = timezone(timedelta(hours=2))
    assert validate_metadata("c1", datetime(2026, 12, 1, 14, tzinfo=plus2), LIMITS,
                             now=NOW).tzinfo == UTC
    for when in (datetime(9999, 12, 31, tzinfo=UTC), NOW + skew + timedelta(seconds=1),
                 datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)):
        with pytest.raises(CropRejected) as info:
            validate_metadata("c1", when, LIMITS, now=NOW)
        assert info.value.error == "capture_time.invalid"
    tight = IngestorSettings(max_future_skew_s=0)
    with pytest.raises(CropRejected, match="ahead of the ingestor's clock"):
        validate_metadata("c1", NOW + timedelta(seconds=1), tight, now=NOW)


def test_the_contract_bounds_capture_time_against_ingested_at() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    for when in (datetime(9999, 1, 1, tzinfo=UTC), datetime(1969, 1, 1, tzinfo=UTC)):
        with pytest.raises(ValidationError, match="capture_time"):
            CropEvent(**{**_EVENT, "capture_time": when, "ingested_at": at}, camera="c1")
    naive = CropEvent(**{**_EVENT, "capture_time": datetime(2026, 1, 1)}, camera="c1")
    assert naive.capture_time == datetime(2026, 1, 1, tzinfo=UTC)
    # an old event replays whatever today's date: the bound is relative to ingested_at
    old = CropEvent(**{**_EVENT, "capture_time": at, "ingested_at": at}, camera="c1")
    assert CropEvent.from_bytes(old.to_bytes()) == old


def test_every_source_produces_valid_camera_ids(tmp_path) -> None:
    from chatreid.synth import SynthConfig
    from chatreid.synth.world import build_site
    from services.ingestor.sources import FolderSource

    site = build_site(SynthConfig(seed=0))
    names = [cam.name for cam in site.cameras]
    for name in names:
        validate_metadata(name, NOW, LIMITS, now=NOW)
    (tmp_path / "cam 2").mkdir()
    for rel in ("cam 2/a.jpg", "0001_c3s1_000151_01.jpg", "other.jpg"):
        (tmp_path / rel).write_bytes(jpeg_bytes())
    source = FolderSource(tmp_path)
    cameras = sorted(source.read(p).camera for p in source.pending())
    assert cameras == ["c3", "cam 2", "unknown"]
    for camera in cameras:
        validate_metadata(camera, NOW, LIMITS, now=NOW)


@pytest.mark.stack
def test_a_rejected_upload_keeps_only_its_first_4_kib_in_the_dead_letter(settings):
    """Each rejected upload used to write its first 64 KiB to the dead-letter topic."""
    import base64
    import hashlib

    from services.ingestor import CropInput, Ingestor
    from services.ingestor.service import REJECTED_PAYLOAD_BYTES

    from .conftest import read_dead_letters

    junk = bytes(range(256)) * 1024  # 256 KiB that no image decoder accepts
    ingestor = Ingestor(settings, source="test")
    result = ingestor.submit(CropInput(data=junk, camera="c1", origin="upload-1",
                                       capture_time=datetime(2026, 1, 1, tzinfo=UTC)))
    ingestor.close()
    assert not result.ok
    [letter] = read_dead_letters(settings, expect=1)
    assert REJECTED_PAYLOAD_BYTES == 4096
    assert base64.b64decode(letter.payload_b64) == junk[:4096] and letter.payload_truncated
    assert f"{len(junk)} bytes" in letter.reason
    assert hashlib.sha256(junk).hexdigest() in letter.reason
    assert letter.error == result.error and letter.origin == "upload-1"
