"""Crop images straight from the object store: ``GET /v1/crops/{id}`` answers, after its access
check, with a redirect (307) to a short-lived presigned GET URL, so crop bytes never pass
through an API replica.

The URL is signed for the endpoint clients reach (``s3.public_endpoint``, default
``s3.endpoint``): a presigned URL's signature covers its host, so one signed for a name only the
cluster resolves would be of no use to a browser. Signing needs no request to that endpoint
(the region is given), so the API's own replicas need not reach it.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from minio import Minio

from chatreid.config import S3Settings
from chatreid.errors import CropGone, StorageUnavailable
from chatreid.storage import ObjectStore

CROP_URL_TTL_S = 300  # long enough to follow the redirect, short enough not to be shared


class CropLinks:
    def __init__(self, settings: S3Settings, objects: ObjectStore | None = None,
                 ttl_s: int = CROP_URL_TTL_S) -> None:
        self.objects = objects or ObjectStore(settings)
        host, secure = _endpoint(settings.public_endpoint or settings.endpoint, settings.secure)
        access_key, secret_key = settings.credentials()
        # us-east-1 when unset: what the store reports to minio's region lookup otherwise
        self.client = Minio(host, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=settings.region or "us-east-1")
        self.bucket, self.ttl = settings.bucket, timedelta(seconds=ttl_s)
        self.origin = f"{'https' if secure else 'http'}://{host}"

    def url(self, key: str) -> str:
        """A GET URL for object ``key``, valid for the TTL."""
        return self.client.presigned_get_object(self.bucket, key, expires=self.ttl)

    def link(self, key: str, crop_id: str) -> str:
        """The URL of an indexed crop's image, once the store says it still holds it: 410
        ``crop.gone`` for an image erased or purged meanwhile, 503 ``storage.unavailable``
        when the store does not answer (a HEAD request, not the bytes)."""
        try:
            present = self.objects.exists(key)
        except Exception as exc:
            raise StorageUnavailable(f"crop {crop_id!r}: the object store did not answer "
                                     f"({type(exc).__name__}); retry later") from None
        if not present:
            raise CropGone(f"crop {crop_id!r}: its image is gone (erased or purged)")
        return self.url(key)


def _endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and TLS of an endpoint given with or without a scheme."""
    if "://" not in endpoint:
        return endpoint, secure
    parts = urlsplit(endpoint)
    return parts.netloc, parts.scheme == "https"
