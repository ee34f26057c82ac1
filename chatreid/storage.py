"""Object storage through the ``minio`` SDK only (MinIO, SeaweedFS or any S3 endpoint)."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from chatreid.config import S3Settings


class ObjectNotFound(KeyError):
    """The key does not exist in the bucket."""


class StoreUnavailable(Exception):
    """The object store failed transiently: retry later (never dead-letter or drop for it)."""


# S3 answers that say "not now" or "not you" rather than "this object/request is bad":
# credentials or bucket trouble would otherwise condemn every crop.
_TRANSIENT_STATUS = {403, 408, 429}
_TRANSIENT_CODES = {"SlowDown", "NoSuchBucket", "RequestTimeout", "AccessDenied",
                    "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def transient_error(exc: BaseException) -> bool:
    """Whether an object-store failure may go away by itself: connection refused or reset,
    timeouts, 5xx, SlowDown, credentials or bucket trouble. A missing key
    (:class:`ObjectNotFound`) or another 4xx (a bad key) is permanent."""
    if isinstance(exc, ObjectNotFound):
        return False
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 500
        return status >= 500 or status in _TRANSIENT_STATUS or exc.code in _TRANSIENT_CODES
    return True  # refused, reset, timeouts, non-XML 5xx pages, urllib3's retries exhausted


CROPS_PREFIX = "crops/"  # every crop image lives under it (see crop_key)
# rerank's cached ViT outputs: <prefix>/<encoder version>/<crop object key> (derived from the
# crop: erasure and retention delete them with it)
VISION_CACHE_PREFIX = "vision-cache"
# Before per-crop keys, crops were content-addressed (crops/<sha[:2]>/<sha>.<ext>): two crops
# with the same bytes share such an object, so erasing one must not delete it for the other.
_LEGACY_KEY = re.compile(r"^crops/[0-9a-f]{2}/([0-9a-f]{64})\.\w+$")
# Object metadata the ingestor writes beside each crop (S3 user metadata, x-amz-meta-*).
META_SHA256 = "sha256"
META_EVENT = "crop-event"  # the CropEvent as compact ASCII JSON, when it fits
MAX_META_BYTES = 2000  # S3's limit on user metadata is 2 KiB in all


def crop_key(crop_id: str, capture_time: datetime, ext: str) -> str:
    """Per-crop key ``crops/<capture date, UTC>/<crop_id>.<ext>``: one object per crop, so
    erasing a crop never deletes another's image; the same sighting (same crop id) always lands
    on the same key, so a re-ingest overwrites instead of adding."""
    day = capture_time.astimezone(UTC).strftime("%Y-%m-%d")
    return f"{CROPS_PREFIX}{day}/{crop_id}.{ext}"


def legacy_crop_key(sha256: str, ext: str) -> str:
    """The old content-addressed key (shared by every crop with these bytes)."""
    return f"{CROPS_PREFIX}{sha256[:2]}/{sha256}.{ext}"


def legacy_key_sha256(object_key: str) -> str | None:
    """The content hash a legacy content-addressed key names; None for any other key."""
    m = _LEGACY_KEY.match(object_key)
    return m.group(1) if m else None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ObjectStore:
    def __init__(self, settings: S3Settings) -> None:
        self.bucket = settings.bucket
        access_key, secret_key = settings.credentials()  # a clear error when none are set
        self.client = Minio(
            settings.endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=settings.secure,
            region=settings.region,
        )

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another process created it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> None:
        self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data),
            content_type=content_type, metadata=dict(metadata) if metadata is not None else None,
        )

    def get(self, key: str) -> bytes:
        return self.read(key)[0]

    def read(self, key: str) -> tuple[bytes, dict[str, str]]:
        """The object's bytes and its user metadata (``x-amz-meta-*``, prefix stripped, names
        lowercased); :class:`ObjectNotFound` when the key does not exist."""
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from exc
            raise
        try:
            data = resp.read()
            meta = {k.lower()[len("x-amz-meta-"):]: v for k, v in resp.headers.items()
                    if k.lower().startswith("x-amz-meta-")}
            return data, meta
        finally:
            resp.close()
            resp.release_conn()

    def metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata without its bytes (a HEAD request)."""
        try:
            stat = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise ObjectNotFound(key) from exc
            raise
        return {k.lower()[len("x-amz-meta-"):]: v for k, v in (stat.metadata or {}).items()
                if k.lower().startswith("x-amz-meta-")}

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    # minio hints every Object field Optional; a listed object always has its name and mtime
    def list(self, prefix: str) -> list[str]:
        return sorted(
            o.object_name for o in self.client.list_objects(self.bucket, prefix, recursive=True)  # pyright: ignore[reportArgumentType]
        )

    def folders(self, prefix: str) -> list[str]:
        """The "folders" right under ``prefix`` (ending in ``/``): S3's common prefixes."""
        return sorted(o.object_name for o in self.client.list_objects(self.bucket, prefix)  # pyright: ignore[reportArgumentType]
                      if o.is_dir)

    def list_modified(self, prefix: str) -> list[tuple[str, datetime]]:
        """Keys under ``prefix`` with their last-modified times (timezone-aware), by key."""
        return sorted(  # pyright: ignore[reportReturnType]
            (o.object_name, o.last_modified)
            for o in self.client.list_objects(self.bucket, prefix, recursive=True)
        )

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete in bulk (up to 1000 keys a request); a missing key is not an error."""
        errors = list(self.client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
        if errors:
            raise RuntimeError(f"{len(errors)} objects not deleted, e.g. {errors[0].name}: "
                               f"{errors[0].code} {errors[0].message}")

    def drop_bucket(self) -> None:
        """Delete every object, then the bucket (test namespaces, scratch runs)."""
        if not self.client.bucket_exists(self.bucket):
            return
        for key in self.list(""):
            self.client.remove_object(self.bucket, key)
        self.client.remove_bucket(self.bucket)

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self.client.presigned_get_object(self.bucket, key, timedelta(seconds=expires_s))

    def healthy(self) -> bool:
        try:
            self.client.bucket_exists(self.bucket)
        except Exception:
            return False
        return True
