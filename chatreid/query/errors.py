"""Failures a client can act on, each with an HTTP status and a stable machine-readable code."""

from __future__ import annotations


class RetrievalError(Exception):
    status: int = 400
    code: str = "query.invalid"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    # Ray Serve pickles exceptions between replicas; keep (detail, code) across the trip.
    def __reduce__(self):
        return (type(self), (self.detail, self.code))


class BadQuery(RetrievalError):
    status, code = 422, "query.invalid"


class UnknownCrop(RetrievalError):
    status, code = 404, "crop.unknown"


class ReplicaUnavailable(RetrievalError):
    """The replica answering died mid-call and its replacement did not answer either (Serve
    is restarting it): retry in a few seconds."""

    status, code = 503, "replica.unavailable"


class AuditUnavailable(RetrievalError):
    """The audit trail could not be written (object store down): nothing is answered without
    its audit entry, so retry later."""

    status, code = 503, "audit.unavailable"


class CropGone(RetrievalError):
    """An indexed crop whose image is no longer in object storage (erased or purged since the
    index was read): gone for good, not a server fault."""

    status, code = 410, "crop.gone"


class StorageUnavailable(RetrievalError):
    """The object store did not answer (down, timing out, 5xx): retry later."""

    status, code = 503, "storage.unavailable"


class EmptyGallery(RetrievalError):
    status, code = 404, "gallery.empty"


class ImageRejected(RetrievalError):
    """An uploaded query image that cannot be used (code: image.too_large, image.corrupt...)."""

    status, code = 422, "image.invalid"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail, code)
        if self.code in ("image.too_large", "image.bomb"):
            self.status = 413


class ModelUnavailable(RetrievalError):
    status, code = 503, "model.unavailable"


def read_crop(objects, key: str, what: str) -> bytes:
    """A crop image's bytes for a query; its failures as errors a client can act on: a
    vanished object is 410 ``crop.gone``, a store that does not answer 503
    ``storage.unavailable`` - never a 500."""
    from chatreid.storage import ObjectNotFound

    try:
        return objects.get(key)
    except ObjectNotFound:
        raise CropGone(f"{what}: its image is gone (erased or purged)") from None
    except Exception as exc:
        raise StorageUnavailable(f"{what}: the object store did not answer "
                                 f"({type(exc).__name__}); retry later") from None
