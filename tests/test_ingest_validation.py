import io
import struct
import zlib

import pytest
from PIL import Image

from chatreid.config import IngestorSettings
from chatreid.services.ingestor import CropRejected, validate_crop

from .conftest import jpeg_bytes

LIMITS = IngestorSettings()


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
