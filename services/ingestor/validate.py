"""Crop validation: the metadata (camera id, capture time) against the contract and the clock,
and the image with Pillow: format, size limits, decompression-bomb guard, full decode."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from PIL import Image, UnidentifiedImageError

from chatreid.config import IngestorSettings
from schemas.events import CAMERA_PATTERN, EPOCH, as_utc

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class CropRejected(ValueError):
    """A crop that must not enter the pipeline; ``error`` is a stable class for dead letters."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.reason = reason


@dataclass(frozen=True)
class ValidCrop:
    format: str
    width: int
    height: int
    mode: str

    @property
    def ext(self) -> str:
        return _EXT.get(self.format, self.format.lower())

    @property
    def content_type(self) -> str:
        return Image.MIME.get(self.format, "application/octet-stream")


_CAMERA = re.compile(CAMERA_PATTERN)  # Python's \w is Unicode too: the contract's pattern


def validate_metadata(camera: str, capture_time: datetime, limits: IngestorSettings,
                      now: datetime | None = None) -> datetime:
    """Refuse a camera id the contract would refuse and an implausible capture time (before
    1970, or more than ``max_future_skew_s`` ahead of ``now``); returns the time in UTC (a
    naive time is UTC)."""
    if not isinstance(camera, str) or len(camera) > 128 or not _CAMERA.fullmatch(camera):
        raise CropRejected("camera.invalid", f"camera {camera!r:.80} is not a valid camera id "
                           "(1-128 letters, digits, . : @ # + - _ and single inner spaces, "
                           "starting with a letter or digit)")
    when = as_utc(capture_time)
    now = now or datetime.now(UTC)
    if when < EPOCH:
        raise CropRejected("capture_time.invalid", f"capture time {when.isoformat()} is before "
                           "1970")
    if when > now + timedelta(seconds=limits.max_future_skew_s):
        raise CropRejected("capture_time.invalid", f"capture time {when.isoformat()} is more "
                           f"than {limits.max_future_skew_s:g} s ahead of the ingestor's clock "
                           f"({now.isoformat(timespec='seconds')})")
    return when


def validate_crop(data: bytes, limits: IngestorSettings) -> ValidCrop:
    if not data:
        raise CropRejected("image.empty", "no bytes received")
    if len(data) > limits.max_bytes:
        raise CropRejected("image.too_large",
                           f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns below 2x its own limit; a bomb must be an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, (w, h), mode = img.format or "", img.size, img.mode
            if fmt not in limits.formats:
                raise CropRejected("image.format",
                                   f"format {fmt or 'unknown'} not in {list(limits.formats)}")
            _check_size(w, h, limits)
            img.load()  # full decode: truncated or corrupt data fails here, not downstream
    except CropRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CropRejected("image.bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise CropRejected("image.corrupt", "not a decodable image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CropRejected("image.corrupt", f"decode failed: {exc}") from exc
    return ValidCrop(format=fmt, width=w, height=h, mode=mode)


def _check_size(w: int, h: int, limits: IngestorSettings) -> None:
    if w * h > limits.max_pixels:
        raise CropRejected("image.bomb", f"{w}x{h} exceeds {limits.max_pixels} pixels")
    if min(w, h) < limits.min_side:
        raise CropRejected("image.too_small", f"{w}x{h} has a side below {limits.min_side}px")
    if max(w, h) > limits.max_side:
        raise CropRejected("image.too_large", f"{w}x{h} has a side above {limits.max_side}px")
