"""Investigator console payloads (schema version 1): sessions, access keys, audit, retention.

A *session* is an investigation: an ordered list of turns (a search with text clues, an image
or a picked crop; a confirm or reject of a result; an explanation asked for). What the next
search uses is derived from the turns - confirmed crops join the query image, rejected crops
never come back, "changed clothes" drops the earlier garment clues - so the state is the turn
log itself and a restarted service rebuilds it exactly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.api import (
    MAX_ATTRIBUTES,
    MAX_TEXT_CHARS,
    ApiQueryKind,
    Attribute,
    CropId,
    QueryFilters,
    ResultItem,
)
from schemas.events import Modality

Role = Literal["investigator", "operator", "admin", "ingest"]
ROLES: tuple[Role, ...] = ("investigator", "operator", "admin", "ingest")


class _Api(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1


# -- access -------------------------------------------------------------------------------------
class ApiKeyCreate(_Api):
    name: str = Field(min_length=1, max_length=128, description="who or what holds the key")
    roles: list[Role] = Field(min_length=1)
    rate_per_minute: int | None = Field(
        None, ge=1, le=100_000, description="requests per minute; None: the site default")


class ApiKeyInfo(_Api):
    """A key as the store keeps it: never the secret, only its hash (not exposed either)."""

    key_id: str
    name: str
    roles: list[Role]
    rate_per_minute: int | None = None
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None


class ApiKeyIssued(ApiKeyInfo):
    secret: str = Field(description="the bearer token; shown once, stored only as a hash")


class Principal(_Api):
    """Who is calling: the key's id, name and roles."""

    key_id: str
    name: str
    roles: list[Role]


# -- cameras -------------------------------------------------------------------------------------
class CameraInfo(_Api):
    camera: str
    crops: int = Field(ge=0, description="indexed crops of this camera")
    last_seen: datetime
    modalities: list[Modality]


class CropInfo(_Api):
    crop_id: str
    camera: str
    modality: Modality
    capture_time: datetime
    url: str


# -- sessions ------------------------------------------------------------------------------------
class SessionCreate(_Api):
    title: str | None = Field(None, max_length=200)
    filters: QueryFilters = Field(default_factory=QueryFilters)


class SearchTurn(_Api):
    """One search step: any of text, attributes, an image (upload or indexed crop)."""

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="added to the "
                             "session's clues; all of them together obey the same limit")
    attributes: list[Attribute] = Field(default_factory=list, max_length=MAX_ATTRIBUTES,
                                        description="added to the session's attributes; all "
                                        "of them together obey the same limit")
    crop_id: CropId | None = Field(None, description="start from an indexed crop")
    image_b64: str | None = Field(None, description="or from an uploaded image (base64); only a "
                                  "body carrying one may exceed access.max_body_bytes")
    changed_clothes: bool = Field(
        False, description="the person may have changed clothes: earlier garment clues are "
        "dropped (also recognised in the text, e.g. 'changed clothes')")
    filters: QueryFilters | None = Field(None, description="replaces the session's filters")
    k: int = Field(20, ge=1, le=200)
    top: int = Field(40, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_image(self) -> SearchTurn:
        if self.crop_id and self.image_b64:
            raise ValueError("give crop_id or image_b64, not both")
        return self


class Feedback(_Api):
    crop_id: CropId
    verdict: Literal["confirm", "reject"]
    note: str | None = Field(None, max_length=500)


class ExplainRequest(_Api):
    crop_id: CropId


class AttributeComparison(_Api):
    attribute: str = Field(description="e.g. upper colour")
    reference: str | None
    candidate: str | None
    agrees: bool | None = Field(description="None when either side is unknown")


class Explanation(_Api):
    crop_id: str
    reference: str = Field(description="what the result was compared with: a crop id, "
                           "'upload', or 'text'")
    rationale: str | None = Field(description="the VLM's own attribute comparison")
    comparison: list[AttributeComparison]
    model_version: str | None


class Sighting(_Api):
    """A confirmed crop: where and when the person was seen."""

    crop_id: str
    camera: str
    modality: Modality
    capture_time: datetime
    url: str
    confirmed_at: datetime


class SessionTurn(_Api):
    index: int = Field(ge=0)
    at: datetime
    actor: str = Field(description="key id of the investigator")
    action: Literal["search", "confirm", "reject", "explain"]
    # search
    text: str | None = None
    attributes: list[str] = Field(default_factory=list)
    image: str | None = Field(default=None, description="crop id, or 'upload:<sha256>'")
    changed_clothes: bool = False
    filters: QueryFilters | None = None
    query_kind: ApiQueryKind | None = Field(default=None, title="Query Kind")
    results: list[ResultItem] = Field(default_factory=list)
    vlm_calls: int = 0
    model_version: str | None = None
    # confirm / reject / explain
    crop_id: str | None = None
    sighting: Sighting | None = None
    note: str | None = None
    explanation: Explanation | None = None


class SessionView(_Api):
    session_id: str
    title: str | None
    owner: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    filters: QueryFilters
    clues: list[str] = Field(description="text clues the next search uses")
    anchors: list[str] = Field(description="images the next search uses: crop ids, "
                               "'upload:<sha256>'")
    changed_clothes: bool
    confirmed: list[Sighting] = Field(description="in capture-time order (the timeline)")
    rejected: list[str]
    turns: list[SessionTurn]


class SessionSummary(_Api):
    session_id: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    turns: int
    confirmed: int


# -- audit ---------------------------------------------------------------------------------------
class AuditEntry(_Api):
    """One accountable action. Written before the response leaves; never changed afterwards."""

    entry_id: str
    at: datetime
    actor: str = Field(description="key id ('anonymous' when access control is off)")
    actor_name: str
    action: str = Field(description="query | view | session.create | session.search | ... ")
    status: int = Field(description="HTTP status of the answer")
    query_kind: ApiQueryKind | None = Field(default=None, title="Query Kind")
    filters: QueryFilters | None = None
    result_ids: list[str] = Field(default_factory=list)
    target: str | None = Field(None, description="crop, session, key or model acted on")
    detail: str | None = None


# -- retention and erasure -----------------------------------------------------------------------
class ErasureRequest(_Api):
    """Erase a person: every confirmed crop of a session, and/or the crops named."""

    session_id: str | None = Field(None, max_length=64)
    crop_ids: list[CropId] = Field(default_factory=list, max_length=10_000)
    reason: str = Field(min_length=1, max_length=500, description="recorded in the audit log")

    @model_validator(mode="after")
    def _something(self) -> ErasureRequest:
        if not self.session_id and not self.crop_ids:
            raise ValueError("give session_id or crop_ids")
        return self


class ErasureReport(_Api):
    erased: list[str] = Field(description="crop ids removed from the index and storage")
    unknown: list[str] = Field(description="crop ids that were not indexed")
    objects_deleted: int
    at: datetime


# `POST /v1/admin/retention/purge?days=`: from one hour (a slip of the finger below that
# erases the gallery) to a hundred years; finite.
PURGE_DAYS_MIN = 1 / 24
PURGE_DAYS_MAX = 36_525.0


class RetentionReport(_Api):
    cutoff: datetime
    crops_erased: int
    objects_deleted: int
    sessions_deleted: int
    at: datetime


# -- operations ----------------------------------------------------------------------------------
class RolloutRequest(_Api):
    """Roll the VLM to a model, or - with ``force`` and a ``reason`` - override the rollout
    gate for one checkpoint it refused (a VLM's or an embedder's; audited)."""

    model: str = Field(min_length=1, max_length=300, description="'latest', a base model, or a "
                       "checkpoint version (`chatreid checkpoints`); with force: a checkpoint "
                       "version")
    kind: Literal["vlm", "embedder"] = Field(
        "vlm", description="which model: embedder checkpoints roll out on their own when "
        "pushed, so for an embedder only a forced override is asked for here")
    force: bool = Field(False, description="roll this checkpoint although the rollout gate "
                        "refused it: it is announced again, forced, and the rollout watchers "
                        "roll it with its figures still reported (audited)")
    reason: str | None = Field(None, min_length=1, max_length=1000,
                               description="why it must serve anyway (required with force)")

    @model_validator(mode="after")
    def _forced_with_a_reason(self) -> RolloutRequest:
        if self.force and not (self.reason or "").strip():
            raise ValueError("force needs a reason (it is audited)")
        if self.kind == "embedder" and not self.force:
            raise ValueError("an embedder checkpoint rolls out when it is pushed, through the "
                             "rollout gate; only a forced override (force, reason) is asked "
                             "for here")
        return self


class ScaleRequest(_Api):
    replicas: int = Field(ge=1, le=64, description="rerank replicas")


TrainTarget = Literal["embedder", "1", "2", "3", "all"]


class TrainRequest(_Api):
    """What `chatreid train` runs: the embedder, one HPT stage, or everything."""

    target: TrainTarget = "all"
    preset: str = Field("default", description="training recipe (`chatreid train --preset`)")


class OpsStatus(_Api):
    app_status: str
    deployments: dict[str, str] = Field(description="deployment -> status")
    replicas: dict[str, int]
    model: str | None = Field(description="the rerank model reference in the config")
    model_version: str | None = Field(description="the version a rerank replica serves")
    gallery: int
    embedder_version: str | None


class TrainRun(_Api):
    run_id: str
    target: TrainTarget
    preset: str
    state: Literal["running", "succeeded", "failed"]
    started_at: datetime
    finished_at: datetime | None = None
    detail: str | None = None


CONSOLE_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m for m in (
        ApiKeyCreate, ApiKeyInfo, ApiKeyIssued, Principal, CameraInfo, CropInfo, SessionCreate,
        SearchTurn, Feedback, ExplainRequest, AttributeComparison, Explanation, Sighting,
        SessionTurn, SessionView, SessionSummary, AuditEntry, ErasureRequest, ErasureReport,
        RetentionReport, RolloutRequest, ScaleRequest, TrainRequest, OpsStatus, TrainRun,
    )
}
