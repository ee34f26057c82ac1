"""A crop image read for a query, its storage failures turned into errors a client can act on.
The error types themselves are in :mod:`chatreid.errors`."""

from __future__ import annotations

from chatreid.errors import CropGone, StorageUnavailable
from chatreid.storage import ObjectNotFound, ObjectStore


def read_crop(objects: ObjectStore, key: str, what: str) -> bytes:
    """A crop image's bytes for a query; its failures as errors a client can act on: a
    vanished object is 410 ``crop.gone``, a store that does not answer 503
    ``storage.unavailable`` - never a 500."""
    try:
        return objects.get(key)
    except ObjectNotFound:
        raise CropGone(f"{what}: its image is gone (erased or purged)") from None
    except Exception as exc:
        raise StorageUnavailable(f"{what}: the object store did not answer "
                                 f"({type(exc).__name__}); retry later") from None
