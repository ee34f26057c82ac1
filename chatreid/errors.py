"""Failures a client can act on: each has an HTTP status, a stable machine-readable code and a
detail; one base per concern, so ``except QueryError`` catches query failures only.

- :class:`ChatReIDError` - the root; the API's error handler turns any of them into
  ``{"error": code, "detail": ...}`` with its status (and ``Retry-After`` when it says when);
- :class:`QueryError` - the request itself cannot be answered (bad query, unknown crop, ...);
- :class:`AccessError` - who may call (``chatreid.access``: auth, roles, rate, keys);
- :class:`SessionError` - investigation sessions (``chatreid.sessions``);
- :class:`OpsError` - operator actions (rollouts, gates, training runs);
- :class:`StorageError` - the object store's answer (gone, down, audit not written);
- :class:`ServingError` - the serving runtime (a replica or model not available now).

Light on purpose: the access, session and HTTP layers import it without any ML framework.
"""

from __future__ import annotations


class ChatReIDError(Exception):
    status: int = 400
    code: str = "request.invalid"
    retry_after_s: float | None = None  # when set, the client is told to wait this long

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    # Ray Serve pickles exceptions between replicas; keep (detail, code) across the trip.
    def __reduce__(self):
        return (type(self), (self.detail, self.code))


class QueryError(ChatReIDError):
    status, code = 422, "query.invalid"


class AccessError(ChatReIDError):
    status, code = 401, "auth.required"


class SessionError(ChatReIDError):
    status, code = 404, "session.unknown"


class OpsError(ChatReIDError):
    status, code = 503, "ops.unavailable"


class StorageError(ChatReIDError):
    status, code = 503, "storage.unavailable"


class ServingError(ChatReIDError):
    status, code = 503, "replica.unavailable"


# -- query ------------------------------------------------------------------------------------

class BadQuery(QueryError):
    status, code = 422, "query.invalid"


class UnknownCrop(QueryError):
    status, code = 404, "crop.unknown"


class EmptyGallery(QueryError):
    status, code = 404, "gallery.empty"


class ImageRejected(QueryError):
    """An uploaded query image that cannot be used (code: image.too_large, image.corrupt...)."""

    status, code = 422, "image.invalid"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail, code)
        if self.code in ("image.too_large", "image.bomb"):
            self.status = 413


# -- storage ----------------------------------------------------------------------------------

class CropGone(StorageError):
    """An indexed crop whose image is no longer in object storage (erased or purged since the
    index was read): gone for good, not a server fault."""

    status, code = 410, "crop.gone"


class StorageUnavailable(StorageError):
    """The object store did not answer (down, timing out, 5xx): retry later."""

    status, code = 503, "storage.unavailable"


class AuditUnavailable(StorageError):
    """The audit trail could not be written (object store down): nothing is answered without
    its audit entry, so retry later."""

    status, code = 503, "audit.unavailable"


# -- serving ----------------------------------------------------------------------------------

class ReplicaUnavailable(ServingError):
    """The replica answering died mid-call and its replacement did not answer either (Serve
    is restarting it): retry in a few seconds."""

    status, code = 503, "replica.unavailable"


class ModelUnavailable(ServingError):
    status, code = 503, "model.unavailable"
