"""Event contracts carried on Kafka (schema version 1).

Every event names its kind and schema version, so a consumer can refuse what it does not know
instead of misreading it. Times are timezone-aware UTC; JSON is the wire format.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]
# Camera ids are partition keys, filter values and labels on screen: words (any script), digits
# and ``. : @ # + - _`` with single inner spaces; no control characters, no path separators, and
# it starts with a letter or digit (so no "", "..", " c1").
CAMERA_PATTERN = r"^\w[\w.:@#+\-]*(?: [\w.:@#+\-]+)*$"
CameraId = Annotated[str, Field(min_length=1, max_length=128, pattern=CAMERA_PATTERN,
                                description="camera id: letters, digits, . : @ # + - _ and "
                                "single inner spaces, starting with a letter or digit")]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The contract's own bound on clock skew; the ingestor refuses at its tighter
# ``ingestor.max_future_skew_s``. Relative to ``ingested_at``, so replaying old events is stable.
MAX_CAPTURE_SKEW = timedelta(days=1)
Modality = Literal["rgb", "infrared"]
Stage = Literal["ingestor", "embedder"]
RolloutStatus = Literal["started", "completed", "refused", "rolled_back"]
CheckpointModel = Literal["embedder", "vlm"]
CheckpointStage = Literal["embedder", "stage1", "stage2", "stage3"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Timezone-aware UTC; a naive time is taken as UTC (never as the host's local time)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcTime = Annotated[datetime, AfterValidator(as_utc)]


class EventError(ValueError):
    """An event that cannot be decoded or does not match its contract."""


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes | str):
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise EventError(f"invalid {cls.__name__}: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    """One readable line for dead letters and logs."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
                     for e in exc.errors())


class BBox(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(gt=0)
    h: int = Field(gt=0)


class CropEvent(_Event):
    """A person crop stored in object storage, published by an ingestor (topic ``crops.v1``)."""

    kind: Literal["crop"] = "crop"
    crop_id: str = Field(min_length=1, max_length=256, description="stable id; idempotency key")
    site: str = Field(min_length=1, max_length=128)
    camera: CameraId
    modality: Modality = "rgb"
    capture_time: UtcTime = Field(description="UTC (a naive time is UTC); from 1970 on, and "
                                  "at most a day after ingested_at")
    track_id: str | None = Field(None, max_length=128)
    detection_id: str | None = Field(None, max_length=128)
    bbox: BBox | None = None
    object_key: str = Field(min_length=1, max_length=1024)
    sha256: Sha256
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    content_type: str = "image/jpeg"
    source: str = Field("unknown", description="folder | synth | http | ...")
    ingested_at: UtcTime = Field(default_factory=utcnow)
    labels: dict[str, str] = Field(
        default_factory=dict, description="optional ground truth or site tags (not used to index)"
    )

    @model_validator(mode="after")
    def _plausible_capture_time(self) -> CropEvent:
        if self.capture_time < EPOCH:
            raise ValueError(f"capture_time {self.capture_time.isoformat()} is before 1970")
        if self.capture_time > self.ingested_at + MAX_CAPTURE_SKEW:
            raise ValueError(f"capture_time {self.capture_time.isoformat()} is more than "
                             f"{MAX_CAPTURE_SKEW.total_seconds() / 3600:g} h after ingested_at")
        return self


class SourceOffset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    topic: str
    partition: int
    offset: int


class IndexedEvent(_Event):
    """A crop embedded and written to the prefilter store (topic ``indexed.v1``).

    It carries the vector, so any prefilter replica can rebuild the store from a snapshot plus
    this topic, without the embedder.
    """

    kind: Literal["indexed"] = "indexed"
    crop_id: str
    vector_id: int = Field(ge=0, description="stable 64-bit id in the FAISS store")
    site: str
    camera: str
    modality: Modality
    capture_time: datetime
    object_key: str
    embedder_version: str
    dim: int = Field(gt=0)
    vector_b64: str = Field(description="little-endian float32, L2-normalised, base64")
    source: SourceOffset
    indexed_at: datetime = Field(default_factory=utcnow)
    colours_b64: str | None = Field(
        default=None, description="the crop's colour-attribute vector (little-endian float32, "
        "base64; per garment part, the share of its pixels in each colour term), computed at "
        "embed time so text queries read no images; None from embedders before it existed")
    colours_version: str | None = Field(
        default=None, description="the colour matcher that computed colours_b64; a store "
        "ignores vectors of another version")

    @staticmethod
    def encode_vector(vec: np.ndarray) -> str:
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()

    def colours(self, dim: int) -> np.ndarray | None:
        """The colour vector, or None when absent or not ``dim`` values long."""
        if self.colours_b64 is None:
            return None
        arr = np.frombuffer(base64.b64decode(self.colours_b64), dtype="<f4")
        return arr.astype(np.float32) if arr.shape == (dim,) else None

    def vector(self) -> np.ndarray:
        arr = np.frombuffer(base64.b64decode(self.vector_b64), dtype="<f4")
        if arr.shape != (self.dim,):
            raise EventError(f"vector has {arr.size} values, expected dim={self.dim}")
        return arr.astype(np.float32)


class ErasedEvent(_Event):
    """A crop erased (right to erasure, or retention), on the ``indexed.v1`` log keyed by its
    camera, so it follows the crop's ``IndexedEvent`` on the same partition.

    Every prefilter store drops the crop, whatever its embedder version, and ignores any later
    ``IndexedEvent`` of it (a late batch, a rollout re-embed); the crop's object is deleted once
    this event is durable.
    """

    kind: Literal["erased"] = "erased"
    crop_id: str = Field(min_length=1, max_length=256)
    camera: str = Field(min_length=1, max_length=128, description="the partition key")
    reason: str = Field(min_length=1, max_length=500,
                        description='why: "retention", or the erasure request\'s reason')
    request_id: str = Field(min_length=1, max_length=256,
                            description="the erasure request or purge run it belongs to")
    erased_at: datetime = Field(default_factory=utcnow)


IndexLogEvent = Annotated[IndexedEvent | ErasedEvent, Field(discriminator="kind")]
_INDEX_LOG: TypeAdapter[IndexedEvent | ErasedEvent] = TypeAdapter(IndexLogEvent)


def parse_index_log(raw: bytes | str) -> IndexedEvent | ErasedEvent:
    """Decode a record of the ``indexed.v1`` log, whichever kind it is."""
    try:
        return _INDEX_LOG.validate_json(raw)
    except ValidationError as exc:
        raise EventError(f"invalid indexed-log event: {_problems(exc)}") from exc


class DeadLetterEvent(_Event):
    """Something that could not be processed, with why (topic ``deadletter.v1``)."""

    kind: Literal["deadletter"] = "deadletter"
    stage: Stage
    error: str = Field(description="short machine-readable class, e.g. image.corrupt")
    reason: str = Field(description="human-readable explanation")
    source: SourceOffset | None = None
    origin: str | None = Field(None, description="file path, upload name or crop id")
    payload_b64: str | None = Field(None, description="original bytes, truncated to 64 KiB")
    payload_truncated: bool = False
    failed_at: datetime = Field(default_factory=utcnow)

    @staticmethod
    def wrap_payload(raw: bytes | None, limit: int = 64 * 1024) -> dict[str, Any]:
        if raw is None:
            return {"payload_b64": None, "payload_truncated": False}
        return {
            "payload_b64": base64.b64encode(raw[:limit]).decode(),
            "payload_truncated": len(raw) > limit,
        }


class CheckpointFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: Sha256
    size: int = Field(ge=0)


class ForcedRollout(BaseModel):
    """Who overrode the rollout gate for a checkpoint, and why (audited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    by: str = Field(min_length=1, max_length=200, description="the principal who forced it")
    reason: str = Field(min_length=1, max_length=1000, description="why, as given")
    at: datetime = Field(default_factory=utcnow)


class CheckpointEvent(_Event):
    """A model checkpoint pushed to object storage (topic ``checkpoints.v1``)."""

    kind: Literal["checkpoint"] = "checkpoint"
    model: CheckpointModel
    stage: CheckpointStage
    version: str = Field(min_length=1)
    bucket: str
    prefix: str = Field(description="object prefix holding the checkpoint files")
    manifest_key: str
    manifest_sha256: Sha256
    parent_version: str | None = None
    files: list[CheckpointFile] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    forced: ForcedRollout | None = Field(
        default=None, description="set on a re-announcement that overrides the rollout gate")


class DeploymentEvent(_Event):
    """A step of a rollout (topic ``deployments.v1``): a VLM onto the rerank replicas, or an
    embedder onto the embedding service and its index.

    ``started`` when a verified checkpoint that passed the rollout gate begins rolling,
    ``completed`` when it serves, ``refused`` when it failed verification, the smoke query or
    the gate (``candidate``/``serving``: both validation figures) before anything moved,
    ``rolled_back`` when a replica failed and the previous version was restored.
    """

    kind: Literal["deployment"] = "deployment"
    model: Literal["vlm", "embedder"] = "vlm"
    status: RolloutStatus
    version: str = Field(min_length=1, description="the checkpoint version being rolled out")
    previous_version: str | None = Field(None, description="what served before (and after a "
                                         "refusal or rollback)")
    reason: str | None = Field(None, description="why it was refused or rolled back")
    replicas: int = Field(default=0, ge=0, description="rerank replicas serving the version")
    candidate: dict[str, float] = Field(
        default_factory=dict, description="the gate's validation figures of the new version "
        "(e.g. gate/mAP); for a VLM: its reranked figures")
    serving: dict[str, float] = Field(
        default_factory=dict, description="the same figures of what serves now; for a VLM: the "
        "prefilter alone, which its reranking must not fall below")
    forced: bool = Field(
        default=False, description="rolled although the gate refused it (audited)")
    at: datetime = Field(default_factory=utcnow)


EVENT_MODELS: dict[str, type[_Event]] = {
    "CropEvent": CropEvent,
    "IndexedEvent": IndexedEvent,
    "ErasedEvent": ErasedEvent,
    "DeadLetterEvent": DeadLetterEvent,
    "CheckpointEvent": CheckpointEvent,
    "DeploymentEvent": DeploymentEvent,
}
