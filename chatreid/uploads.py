"""Images from outside, checked in one place: a crop the ingestor receives and a query image a
client uploads obey the same limits (``ingestor.*``: format, bytes, pixels, sides) and are
fully decoded once before anything else reads them.

- :func:`validate_crop`: bytes -> :class:`ValidCrop`, or :class:`CropRejected` with a stable
  error class (``image.too_large``, ``image.bomb``, ...) the ingestor puts on its dead letters;
- :func:`decode_upload`: an API upload (base64) -> validated bytes, or the client's 413/422
  (:class:`chatreid.errors.ImageRejected` with the same error class).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from chatreid.config import IngestorSettings
from chatreid.errors import ImageRejected

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class CropRejected(ValueError):
    """An image that must not enter the pipeline; ``error`` is a stable class for dead letters
    and API errors, ``reason`` says what is wrong with it."""

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


def validate_crop(data: bytes, limits: IngestorSettings) -> ValidCrop:
    """Format, byte and pixel limits, the decompression-bomb guard and a full decode."""
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


def decode_upload(image_b64: str, limits: IngestorSettings) -> bytes:
    """An uploaded query image (base64), held to the limits of ingested crops; a bad one is
    the client's error (413 ``image.too_large``, 422 otherwise), raised before any decode of
    an oversized string."""
    if len(image_b64) > limits.max_bytes * 4 // 3 + 4:
        raise ImageRejected(f"the image exceeds the limit of {limits.max_bytes} bytes",
                            "image.too_large")
    try:
        data = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("image_b64 is not valid base64", "image.corrupt") from None
    try:
        validate_crop(data, limits)
    except CropRejected as exc:
        raise ImageRejected(exc.reason, exc.error) from None
    return data
