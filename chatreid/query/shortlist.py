"""The prefilter step of a query: a request (and its upload, validated already) in, the
gallery's top K out.

Why a step of its own: this is where the API's request meets the index - which image is
embedded (an indexed crop, an upload, anchors), which filters apply (:func:`search_filter`,
the one place they are resolved), what the kind searches with (``QueryKind.has_image`` /
``has_text``) - while :class:`~chatreid.prefilter.search.PrefilterSearch` below it knows
embedders and stores, not requests.

Image queries search the FAISS store with the rolled-out embedder (cosine ≥ τ, at most K).
Text and attribute queries have no image to embed - the prefilter embedder is image-only - so
the newest ``serve.text_window`` crops inside the filters are ranked by the colour-attribute
matcher (the garment colours the clue names vs each crop's colours; ``chatreid.colours``)
and the best K go to the VLM; camera, modality and time window narrow the window. Multimodal
queries (image + text) rank the image's cosine top 100 together with the clue's colour-match
top 100 by the mean of cosine and colour match, as the evaluation's multimodal prefilter does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from chatreid.errors import BadQuery, EmptyGallery, UnknownCrop
from chatreid.prefilter.search import PrefilterSearch, SearchResult
from chatreid.prefilter.store import SearchFilter, VectorMeta
from chatreid.query.crops import read_crop
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


def build_shortlist(search: PrefilterSearch, request: QueryRequest, upload: bytes | None = None,
                    *, window: int = 1000) -> Shortlist:
    """The shortlist of ``request``. ``upload``: the query image's bytes when the request
    carried one, validated by the caller (``chatreid.uploads.decode_upload``: once per query,
    before any hop); ``window``: the newest crops a text clue is matched against."""
    if request.image_b64 and upload is None:
        raise ValueError("decode and validate the upload first (chatreid.uploads.decode_upload)")
    kind = request.kind
    key = modality = None
    exclude: set[str] = set(request.exclude)
    if request.crop_id:
        meta = _lookup(search, request.crop_id, f"crop {request.crop_id!r} is not in the index "
                       "(unknown id, or not indexed yet)")
        key, modality = meta.object_key, meta.modality
        exclude.add(meta.crop_id)
    elif upload is not None:
        modality = _modality_of(upload)
    filters = search_filter(request, modality)
    try:
        if kind.has_image:
            image = _image(search, key, upload)
            clue = _clue(request) if kind.has_text else None  # multimodal: image + text
            anchors = [_image(search, _lookup(search, a, f"anchor crop {a!r} is not in the "
                                              "index").object_key, None)
                       for a in request.anchors]
            exclude.update(request.anchors)  # known sightings, not results
            items = search.search(image, k=request.k, tau=request.tau, filters=filters,
                                  exclude=exclude, clue=clue, anchors=anchors, window=window)
        else:
            items = search.describe(_clue(request), k=request.k, tau=request.tau,
                                    filters=filters, exclude=exclude, window=window)
    except LookupError as exc:
        raise EmptyGallery(str(exc)) from None
    return Shortlist(kind, key, upload, modality, items, search.gallery_size(), search.version)


def search_filter(request: QueryRequest, query_modality: str | None = None) -> SearchFilter:
    """The request's filters as the store applies them (camera set, modality, time window in
    epoch seconds), with the one rule a kind adds: a visible-infrared query searches the other
    spectrum than its image's unless the request names a modality."""
    f = request.filters
    modality = f.modality
    if (request.kind is QueryKind.VISIBLE_INFRARED and modality is None
            and query_modality is not None):
        modality = _OTHER[query_modality]  # cross-modality by definition
    try:
        return SearchFilter(
            cameras=frozenset(f.cameras) if f.cameras else None,
            modality=modality,
            time_from=f.time_from.timestamp() if f.time_from else None,
            time_to=f.time_to.timestamp() if f.time_to else None,
        )
    except ValueError as exc:
        raise BadQuery(str(exc)) from None


def _lookup(search: PrefilterSearch, crop_id: str, unknown: str) -> VectorMeta:
    try:
        return search.lookup(crop_id)
    except KeyError:
        raise UnknownCrop(unknown) from None


def _image(search: PrefilterSearch, key: str | None, data: bytes | None) -> Image.Image:
    if data is None:
        data = read_crop(search.objects, key, "the query crop")  # pyright: ignore[reportArgumentType]  (key or data)
    return Image.open(io.BytesIO(data)).convert("RGB")


def _clue(request: QueryRequest) -> str:
    """What the colour matcher reads: the description, then the attribute phrases."""
    return "; ".join([request.text or "", *request.attributes])


def _modality_of(data: bytes) -> str:
    """Infrared crops are single-channel (or grey in RGB); anything with colour is visible."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("L", "I", "I;16", "F"):
        return "infrared"
    small = np.asarray(img.convert("RGB").resize((16, 32)), dtype=np.int16)
    spread = int((small.max(axis=2) - small.min(axis=2)).max())  # the most colourful pixel
    return "infrared" if spread <= 6 else "rgb"
