"""The HTTP API (FastAPI on Serve's proxy): query, crops, health, the investigator console and
its sessions, admin and operator routes; OpenAPI at ``/docs``.

A query is two hops (``ConsoleRoutes.answer``, the one query path): an upload is validated
here, the prefilter deployment shortlists the gallery, a rerank replica runs the best-choice
dialogue over the shortlist; the answer is assembled here. Crop images are a redirect to the
object store (``console_routes``, ``crop_links``), after the access check and audit. Every /v1
route checks the caller's key and role (``chatreid.access``) and leaves an audit entry; every
failure a client can act on comes back as an ``ErrorResponse`` with its HTTP status.
"""

# No `from __future__ import annotations` here: Serve pickles this class by value, and FastAPI
# must still resolve the route annotations in a restarted replica.
import time

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from chatreid.access import Caller
from chatreid.cluster import unshare
from chatreid.errors import ChatReIDError
from schemas import QueryRequest, QueryResponse
from schemas.console import Principal
from services.retrieval.admin_routes import AdminRoutes, OpsRoutes
from services.retrieval.console_routes import ConsoleRoutes
from services.retrieval.http import ERRORS, build_api, route, small_unless_image

_LATENCY_MS: list[float] = [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 20_000, 60_000]
_COUNTS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200]


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress(ConsoleRoutes, AdminRoutes, OpsRoutes):
    def __init__(self, prefilter: DeploymentHandle, rerank: DeploymentHandle,
                 settings: dict | None) -> None:
        super().__init__(unshare(settings))
        self.prefilter, self.rerank = prefilter, rerank
        kind = ("kind",)
        self.queries = metrics.Counter(
            "chatreid_queries", description="queries answered, by kind and outcome",
            tag_keys=("kind", "outcome"))  # pyright: ignore[reportArgumentType] (Ray: Tuple[str])
        self.latency = metrics.Histogram(
            "chatreid_query_latency_ms", description="end-to-end query latency",
            boundaries=_LATENCY_MS, tag_keys=kind)
        self.vlm_calls = metrics.Histogram(
            "chatreid_vlm_calls_per_query", description="VLM forward passes per query",
            boundaries=_COUNTS, tag_keys=kind)
        self.reranked = metrics.Histogram(
            "chatreid_candidates_reranked", description="candidates the VLM reranked",
            boundaries=_COUNTS, tag_keys=kind)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.body_limits, self.origins, not self.keys.enabled)

    @route("POST", "/v1/query", role="investigator", response_model=QueryResponse, responses=ERRORS)
    async def query(self, payload: QueryRequest, request: Request) -> QueryResponse:
        """Ask where a person appeared: by crop id or uploaded image, text, attributes
        (role: investigator)."""
        caller: Caller = request.state.caller
        await small_unless_image(request, bool(payload.image_b64), self.body_limits[0])
        t0 = time.perf_counter()
        try:
            response = await self.answer(payload)
        except ChatReIDError as exc:
            self.queries.inc(tags={"kind": payload.kind.value, "outcome": exc.code})
            await self.audit(caller, "query", exc.status, query_kind=payload.kind,
                             filters=payload.filters, detail=exc.code)
            raise
        await self.audit(caller, "query", query_kind=payload.kind, filters=payload.filters,
                         target=payload.crop_id,
                         result_ids=[r.crop_id for r in response.results])
        tags = {"kind": payload.kind.value}
        self.queries.inc(tags={**tags, "outcome": "ok"})
        self.latency.observe((time.perf_counter() - t0) * 1000, tags=tags)
        self.vlm_calls.observe(response.vlm_calls, tags=tags)
        self.reranked.observe(sum(r.reranked for r in response.results), tags=tags)
        return response

    @route("GET", "/v1/me", role=None, response_model=Principal, responses=ERRORS)
    async def me(self, request: Request) -> Principal:
        """Who the key belongs to and its roles."""
        return request.state.caller.principal()

    @route("GET", "/healthz")
    async def healthz(self) -> dict:
        """Liveness plus what is served: gallery size, embedder and VLM versions, and whether
        access control is on (``access_control``: false only with ``access.insecure``)."""
        status = await self.prefilter.status.remote()
        return {"status": "ok", **status, "model_version": await self.rerank.version.remote(),
                "access_control": self.keys.enabled}

    # -- the investigator console (static files; the page asks for a key) ---------------------
    @route("GET", "/console", include_in_schema=False)
    async def console_root(self) -> RedirectResponse:
        return RedirectResponse("console/", status_code=308)

    @route("GET", "/console/", include_in_schema=False)
    async def console_page(self) -> Response:
        return self._asset("index.html")

    @route("GET", "/console/{name}", include_in_schema=False)
    async def console_asset(self, name: str) -> Response:
        return self._asset(name)

    def _asset(self, name: str) -> Response:
        from services.retrieval.console import asset

        try:
            data, content_type = asset(name, self.crop_links.origin)
        except KeyError:
            return Response(status_code=404)
        return Response(content=data, media_type=content_type, headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                       "style-src 'self'; script-src 'self'; "
                                       f"connect-src 'self' {self.crop_links.origin}; "
                                       "frame-ancestors 'none'"})
