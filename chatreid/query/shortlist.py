"""The prefilter side of a query: resolve the query image, apply filters and τ, cap at K.

Image queries search the FAISS store with the rolled-out embedder (cosine ≥ τ, at most K).
Text and attribute queries have no image to embed - the prefilter embedder is image-only - so
the newest ``serve.text_window`` crops inside the filters are ranked by the colour-attribute
matcher (the garment colours the clue names vs each crop's colours; ``chatreid.embedder.colour``)
and the best K go to the VLM; camera, modality and time window narrow the window. Adaptive
queries (image + text) rank the image's cosine top 100 together with the clue's colour-match
top 100 by the mean of cosine and colour match, as the evaluation's adaptive prefilter does.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

from chatreid.config import IngestorSettings
from chatreid.errors import BadQuery, EmptyGallery, ImageRejected, UnknownCrop
from chatreid.prefilter.search import PrefilterSearch, SearchResult
from chatreid.prefilter.store import SearchFilter
from chatreid.query.errors import read_crop
from schemas import QueryKind, QueryRequest

_OTHER = {"rgb": "infrared", "infrared": "rgb"}


@dataclass(frozen=True)
class Shortlist:
    """What the rerank replicas need: the query image (an object key or the uploaded bytes)
    and the candidates in prefilter order, with where to fetch each crop."""

    kind: QueryKind
    query_key: str | None
    query_bytes: bytes | None
    query_modality: str | None
    items: list[SearchResult]
    gallery: int  # crops in the index when the query ran
    embedder_version: str


class Shortlister:
    def __init__(self, search: PrefilterSearch, limits: IngestorSettings,
                 text_window: int = 1000) -> None:
        self.search = search
        self.limits = limits
        self.text_window = text_window

    def shortlist(self, request: QueryRequest) -> Shortlist:
        kind = request.kind
        filters = _filters(request)
        key = data = modality = None
        exclude: set[str] = set(request.exclude)
        if request.crop_id:
            try:
                meta = self.search.lookup(request.crop_id)
            except KeyError:
                raise UnknownCrop(f"crop {request.crop_id!r} is not in the index (unknown id, "
                                  "or not indexed yet)") from None
            key, modality = meta.object_key, meta.modality
            exclude.add(meta.crop_id)
        elif request.image_b64:
            data = decode_upload(request.image_b64, self.limits)
            modality = _modality_of(data)
        if kind is QueryKind.VISIBLE_INFRARED and filters.modality is None and modality:
            # cross-modality by definition: search the other spectrum unless told otherwise
            filters = SearchFilter(filters.cameras, _OTHER[modality], filters.time_from,
                                   filters.time_to)
        try:
            if kind.has_image:
                image = self._query_image(key, data)
                clue = _clue(request) if kind.has_text else None  # adaptive: image + text
                anchors = [self._query_image(self._key_of(a), None) for a in request.anchors]
                exclude.update(request.anchors)  # known sightings, not results
                items = self.search.search(image, k=request.k, tau=request.tau,
                                           filters=filters, exclude=exclude, clue=clue,
                                           anchors=anchors, window=self.text_window)
            else:
                items = self.search.describe(_clue(request), k=request.k, tau=request.tau,
                                             filters=filters, exclude=exclude,
                                             window=self.text_window)
        except LookupError as exc:
            raise EmptyGallery(str(exc)) from None
        return Shortlist(kind, key, data, modality, items, self.search.gallery_size(),
                         self.search.version)

    def _key_of(self, crop_id: str) -> str:
        try:
            return self.search.lookup(crop_id).object_key
        except KeyError:
            raise UnknownCrop(f"anchor crop {crop_id!r} is not in the index") from None

    def _query_image(self, key: str | None, data: bytes | None) -> Image.Image:
        if data is None:
            data = read_crop(self.search.objects, key, "the query crop")  # type: ignore[arg-type]
        return Image.open(io.BytesIO(data)).convert("RGB")


def _clue(request: QueryRequest) -> str:
    """What the colour matcher reads: the description, then the attribute phrases."""
    return "; ".join([request.text or "", *request.attributes])


def _filters(request: QueryRequest) -> SearchFilter:
    f = request.filters
    try:
        return SearchFilter(
            cameras=frozenset(f.cameras) if f.cameras else None,
            modality=f.modality,
            time_from=f.time_from.timestamp() if f.time_from else None,
            time_to=f.time_to.timestamp() if f.time_to else None,
        )
    except ValueError as exc:
        raise BadQuery(str(exc)) from None


def decode_upload(image_b64: str, limits: IngestorSettings) -> bytes:
    """The uploaded query image, held to the same limits as ingested crops."""
    from services.ingestor.validate import CropRejected, validate_crop

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


def _modality_of(data: bytes) -> str:
    """Infrared crops are single-channel (or grey in RGB); anything with colour is visible."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("L", "I", "I;16", "F"):
        return "infrared"
    small = img.convert("RGB").resize((16, 32))
    spread = max(max(px) - min(px) for px in small.getdata())
    return "infrared" if spread <= 6 else "rgb"
