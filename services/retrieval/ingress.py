"""The HTTP API (FastAPI on Serve's proxy): query, crops, health; OpenAPI at ``/docs``.

A query is two hops: the prefilter deployment shortlists the gallery, a rerank replica runs the
best-choice dialogue over the shortlist; the answer is assembled here. Every failure a client
can act on comes back as an ``ErrorResponse`` with its HTTP status.
"""


import hmac
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from chatreid.config import Settings
from chatreid.retrieval import EmptyGallery, RetrievalError, assemble
from chatreid.schemas import ErrorResponse, QueryRequest, QueryResponse

api = FastAPI(
    title="ChatReID retrieval API",
    version="1",
    description="Cross-camera person re-identification: prefilter the gallery with the "
    "embedder, rerank with the fine-tuned VLM's multi-turn best-choice dialogue.",
)

_ERRORS = {s: {"model": ErrorResponse} for s in (401, 404, 413, 422, 503)}
_LATENCY_MS = [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 20_000, 60_000]
_COUNTS = [1, 2, 5, 10, 20, 50, 100, 200]


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(mode="json"),
                        status_code=status)


def _cause(exc: BaseException) -> BaseException:
    """The replica's own exception (Ray wraps it in a RayTaskError on the way back)."""
    return getattr(exc, "cause", None) or exc


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error(422, "query.invalid", detail)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, prefilter: DeploymentHandle, rerank: DeploymentHandle,
                 settings: dict) -> None:
        self.prefilter, self.rerank = prefilter, rerank
        self.settings = Settings.model_validate(settings)
        self.max_body = self.settings.ingestor.max_bytes * 4 // 3 + 64 * 1024
        kind = ("kind",)
        self.queries = metrics.Counter(
            "chatreid_queries", description="queries answered, by kind and outcome",
            tag_keys=("kind", "outcome"))
        self.latency = metrics.Histogram(
            "chatreid_query_latency_ms", description="end-to-end query latency",
            boundaries=_LATENCY_MS, tag_keys=kind)
        self.vlm_calls = metrics.Histogram(
            "chatreid_vlm_calls_per_query", description="VLM forward passes per query",
            boundaries=_COUNTS, tag_keys=kind)
        self.reranked = metrics.Histogram(
            "chatreid_candidates_reranked", description="candidates the VLM reranked",
            boundaries=_COUNTS, tag_keys=kind)

    def _denied(self, request: Request) -> JSONResponse | None:
        """401 unless the API key (``serve.api_key``) is presented, when one is configured."""
        key = self.settings.serve.api_key
        if not key:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _error(401, "auth.required", "send 'Authorization: Bearer <API key>'")
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            return _error(401, "auth.invalid", "the API key is not valid")
        return None

    @api.post("/v1/query", response_model=QueryResponse, responses=_ERRORS)
    async def query(self, payload: QueryRequest, request: Request) -> QueryResponse:
        """Ask where a person appeared: by crop id or uploaded image, text, attributes."""
        if denied := self._denied(request):
            self.queries.inc(tags={"kind": payload.kind, "outcome": "auth"})
            return denied
        if int(request.headers.get("content-length") or 0) > self.max_body:
            self.queries.inc(tags={"kind": payload.kind, "outcome": "image.too_large"})
            return _error(413, "image.too_large", f"request body over {self.max_body} bytes")
        t0 = time.perf_counter()
        try:
            shortlist = await self.prefilter.shortlist.remote(payload)
            if not shortlist.items:
                raise EmptyGallery("no crop passed the prefilter (filters, tau): "
                                   f"{shortlist.gallery} crops are indexed")
            answer = await self.rerank.rerank.remote(payload, shortlist)
        except Exception as exc:
            cause = _cause(exc)
            if not isinstance(cause, RetrievalError):
                raise
            self.queries.inc(tags={"kind": payload.kind, "outcome": cause.code})
            return _error(cause.status, cause.code, cause.detail)
        elapsed = (time.perf_counter() - t0) * 1000
        response = assemble(payload, shortlist, answer, query_id=uuid.uuid4().hex,
                            base_url=self.settings.serve.base_url, elapsed_ms=elapsed)
        tags = {"kind": payload.kind}
        self.queries.inc(tags={**tags, "outcome": "ok"})
        self.latency.observe(elapsed, tags=tags)
        self.vlm_calls.observe(response.vlm_calls, tags=tags)
        self.reranked.observe(answer.result.stats.candidates, tags=tags)
        return response

    @api.get("/v1/crops/{crop_id}", responses={200: {"content": {"image/*": {}}}, **_ERRORS})
    async def crop(self, crop_id: str, request: Request) -> Response:
        """The crop image behind a result's ``url``."""
        if denied := self._denied(request):
            return denied
        try:
            data, content_type = await self.prefilter.crop.remote(crop_id)
        except Exception as exc:
            cause = _cause(exc)
            if not isinstance(cause, RetrievalError):
                raise
            return _error(cause.status, cause.code, cause.detail)
        return Response(content=data, media_type=content_type)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness plus what is served: gallery size, embedder and VLM versions."""
        status = await self.prefilter.status.remote()
        return {"status": "ok", **status, "model_version": await self.rerank.version.remote()}
