"""Crop validation: the metadata (camera id, capture time) against the contract and the clock
here; the image (format, size limits, decompression-bomb guard, full decode) in
:mod:`chatreid.uploads`, shared with the query API's uploads."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from chatreid.config import IngestorSettings
from chatreid.uploads import CropRejected, ValidCrop, validate_crop
from schemas.events import CAMERA_PATTERN, EPOCH, as_utc

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


__all__ = ["CropRejected", "ValidCrop", "validate_crop", "validate_metadata"]
