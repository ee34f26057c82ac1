"""Retrieval API payloads (schema version 1): a query, the dialogue turns, the ranked answer."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from schemas.events import Modality


class QueryKind(StrEnum):
    """What a query asks with - the one list of kinds, for the API, sessions, the prefilter,
    the rerank prompts and the evaluation - and what each kind needs (:attr:`has_image`,
    :attr:`has_text`)."""

    STANDARD = "standard"  # image -> image
    CLOTH_CHANGING = "cloth_changing"
    VISIBLE_INFRARED = "visible_infrared"
    TEXT_TO_IMAGE = "text_to_image"
    ATTRIBUTE = "attribute"  # partial attributes, e.g. "blue top, backpack"
    MULTIMODAL = "multimodal"  # image plus text clues: the paper's "adaptive multi-modal"

    @property
    def has_image(self) -> bool:
        """A query of this kind needs an image (an indexed crop or an upload)."""
        return self not in _TEXT_ONLY

    @property
    def has_text(self) -> bool:
        """A query of this kind needs a text clue (free text or attributes)."""
        return self in _TEXT_ONLY or self is QueryKind.MULTIMODAL

    @classmethod
    def parse(cls, value: str | QueryKind) -> QueryKind:
        """The kind named ``value``, older names included (:data:`QUERY_KIND_ALIASES`: stored
        instruction datasets and results say ``"adaptive"``). The API itself takes the
        current names only."""
        value = QUERY_KIND_ALIASES.get(str(value), str(value))
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise ValueError(f"unknown query kind {value!r}; kinds are {names}") from None


_TEXT_ONLY = frozenset({QueryKind.TEXT_TO_IMAGE, QueryKind.ATTRIBUTE})
# Older names still found in stored data: the paper's "adaptive" query (stage-3 instruction
# datasets, evaluation results, identity heads' kind lists) and stage 3's "attribute_query".
QUERY_KIND_ALIASES = {"adaptive": QueryKind.MULTIMODAL.value,
                      "attribute_query": QueryKind.ATTRIBUTE.value}
# The API field: validated as the enum, published as the plain string enum it always was
# (give such a field its title: a replaced schema loses the automatic one).
ApiQueryKind = Annotated[QueryKind, WithJsonSchema(
    {"type": "string", "enum": [k.value for k in QueryKind]})]
# Limits a query obeys (a session's derived query too): they bound what one request can make
# the VLM read - its prompt grows with the text and attributes (one 20 kB attribute kept a
# replica busy for 109 s).
MAX_TEXT_CHARS = 1000  # free-text description
MAX_ATTRIBUTES = 16  # attribute clues per query
MAX_ATTRIBUTE_CHARS = 64  # one attribute, e.g. "blue top"
MAX_ID_CHARS = 256  # a crop id (as CropEvent), an anchor, an excluded id
MAX_CAMERAS = 256  # cameras in one filter
MAX_CAMERA_CHARS = 128  # one camera name (as CropEvent)


class _Api(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1


def as_utc(value: datetime | None) -> datetime | None:
    """A time in UTC: a timezone-naive one is taken to be UTC already (the contracts' rule),
    an aware one is converted. Out-of-range results (year 0 or 10000) are a ValueError."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value.isoformat()} is outside the supported range in UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
CropId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Attribute = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ATTRIBUTE_CHARS)]
Camera = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CAMERA_CHARS)]


class QueryFilters(BaseModel):
    """Which crops a query may return. Times are normalised to UTC; a time without a zone is
    read as UTC."""

    model_config = ConfigDict(extra="forbid")
    cameras: list[Camera] | None = Field(default=None, max_length=MAX_CAMERAS)
    modality: Modality | None = None
    time_from: UtcDatetime | None = Field(
        default=None, description="captured at or after (UTC if no zone is given)")
    time_to: UtcDatetime | None = Field(
        default=None, description="captured at or before (UTC if no zone is given)")

    @model_validator(mode="after")
    def _window(self) -> QueryFilters:
        if self.time_from and self.time_to and self.time_from > self.time_to:
            raise ValueError("time_from is after time_to")
        return self


class QueryRequest(_Api):
    """What an investigator asks: an image (crop id or upload), text, attributes, filters."""

    kind: ApiQueryKind = Field(default=QueryKind.STANDARD, title="Kind")
    crop_id: CropId | None = Field(default=None, description="query by an indexed crop")
    image_b64: str | None = Field(
        default=None, description="or by an uploaded image (base64); only a body carrying one "
        "may exceed access.max_body_bytes")
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    attributes: list[Attribute] = Field(default_factory=list, max_length=MAX_ATTRIBUTES)
    filters: QueryFilters = Field(default_factory=QueryFilters)
    k: int = Field(default=20, ge=1, le=200, description="cap on candidates the VLM reranks")
    top: int = Field(default=20, ge=1, le=1000, description="results returned")
    tau: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="prefilter cosine threshold")
    rationale: bool = False
    anchors: list[CropId] = Field(
        default_factory=list, max_length=32,
        description="more indexed crops of the same person (e.g. confirmed sightings): the "
        "prefilter searches with the mean of their embeddings and the query image's")
    exclude: list[CropId] = Field(default_factory=list, max_length=10_000,
                               description="crop ids never returned (e.g. rejected ones)")

    @model_validator(mode="after")
    def _inputs(self) -> QueryRequest:
        has_image = bool(self.crop_id or self.image_b64)
        if self.crop_id and self.image_b64:
            raise ValueError("give crop_id or image_b64, not both")
        if self.kind.has_image and not has_image:
            raise ValueError(f"query kind {self.kind.value!r} needs crop_id or image_b64")
        if self.anchors and not has_image:
            raise ValueError("anchors join a query image: give crop_id or image_b64 too")
        if self.kind.has_text and not (self.text or self.attributes):
            raise ValueError(f"query kind {self.kind.value!r} needs text or attributes")
        return self


class Turn(_Api):
    """One best-choice turn of the rerank dialogue."""

    index: int = Field(ge=0)
    candidates: list[str] = Field(description="crop ids shown in this turn, in order")
    chosen: str
    confidence: float = Field(ge=0.0, le=1.0)


class ResultItem(_Api):
    rank: int = Field(ge=1)
    crop_id: str
    camera: str
    modality: Modality
    capture_time: datetime
    url: str | None = None
    prefilter_score: float | None = Field(
        None, description="cosine to the query image; None for queries without an image")
    prefilter_rank: int = Field(ge=1, description="position in the prefilter's shortlist")
    confidence: float | None = Field(
        None, description="VLM response confidence: the share of the model's belief that this "
        "crop is the query's person (each dialogue turn's pick gets its choice probability times "
        "what the earlier picks left; the reranked results' values sum to at most 1); None = "
        "not reranked")
    reranked: bool = False
    rationale: str | None = None


class QueryResponse(_Api):
    query_id: str
    kind: ApiQueryKind = Field(title="Kind")
    results: list[ResultItem]
    turns: list[Turn] = Field(default_factory=list)
    candidates: int = Field(ge=0, description="gallery items that passed the prefilter")
    vlm_calls: int = Field(0, ge=0)
    prefilter_only: bool = Field(description="True when no VLM reranked these results (none "
                                 "serves, or the model abstains on this query kind)")
    model_version: str | None = None
    embedder_version: str
    elapsed_ms: float


class ErrorResponse(_Api):
    error: str
    detail: str


API_MODELS: dict[str, type[BaseModel]] = {
    "QueryRequest": QueryRequest,
    "QueryResponse": QueryResponse,
    "Turn": Turn,
    "ResultItem": ResultItem,
    "ErrorResponse": ErrorResponse,
}
