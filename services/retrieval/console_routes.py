"""Investigator routes (role ``investigator``): the query path (:meth:`ConsoleRoutes.answer`),
crop images, cameras and their recent crops, and sessions - the multi-turn conversation
(search, confirm, reject, explain) kept in object storage.

Every search, result list and crop view is audited with the result ids it showed.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from datetime import UTC, datetime
from functools import cached_property

from fastapi import Query, Request, Response
from fastapi.responses import RedirectResponse
from ray.serve.handle import DeploymentHandle

from chatreid.access import Caller
from chatreid.errors import EmptyGallery, UnknownCrop
from chatreid.query import assemble
from chatreid.sessions import UPLOAD, Session, changed_clothes
from chatreid.storage import sha256_hex
from chatreid.uploads import decode_upload
from schemas import QueryRequest, QueryResponse
from schemas.console import (
    AttributeComparison,
    CameraInfo,
    CropInfo,
    ExplainRequest,
    Explanation,
    Feedback,
    SearchTurn,
    SessionCreate,
    SessionSummary,
    SessionTurn,
    SessionView,
    Sighting,
)
from services.retrieval.crop_links import CropLinks
from services.retrieval.http import ERRORS, Gate, remote, route, small_unless_image


class ConsoleRoutes(Gate):
    """Mixed into the Ingress deployment (``prefilter`` and ``rerank`` handles come from it)."""

    prefilter: DeploymentHandle  # the Prefilter deployment (deployments.PrefilterDeployment)
    rerank: DeploymentHandle  # the Rerank deployment (deployments.RerankDeployment)

    # -- answering a query (also what /v1/query runs) --------------------------------------------
    async def answer(self, payload: QueryRequest, upload: bytes | None = None) -> QueryResponse:
        """The one query path: the upload validated here, once (413/422 before any hop; pass
        ``upload`` when it was validated already), the prefilter replica's shortlist, a rerank
        replica's dialogue, the answer assembled here. The replicas get the image as bytes,
        not as base64 in the request."""
        t0 = time.perf_counter()
        if payload.image_b64 and upload is None:
            upload = decode_upload(payload.image_b64, self.settings.ingestor)
        request = payload.model_copy(update={"image_b64": None}) if upload else payload
        shortlist = await remote(self.prefilter.shortlist, request, upload)
        if not shortlist.items:
            raise EmptyGallery("no crop passed the prefilter (filters, tau): "
                               f"{shortlist.gallery} crops are indexed")
        answer = await remote(self.rerank.rerank, request, shortlist)
        elapsed = (time.perf_counter() - t0) * 1000
        serve = self.settings.serve
        return assemble(payload, shortlist, answer, query_id=uuid.uuid4().hex,
                        base_url=serve.base_url, elapsed_ms=elapsed, ranking=serve.ranking,
                        fused_weight=serve.fused_weight)

    def _url(self, crop_id: str) -> str:
        return f"{self.settings.serve.base_url}/v1/crops/{crop_id}"

    # -- crop images -------------------------------------------------------------------------------
    @cached_property
    def crop_links(self) -> CropLinks:
        return CropLinks(self.settings.s3, self.objects)

    @route("GET", "/v1/crops/{crop_id}", role="investigator",
           responses={307: {"description": "to the crop image: a short-lived presigned URL of "
                            "the object store (clients follow it)"}, **ERRORS})
    async def crop(self, crop_id: str, request: Request) -> Response:
        """The crop image behind a result's ``url`` (role: investigator; audited as a view): a
        redirect to the image in the object store, valid for a few minutes."""
        caller: Caller = request.state.caller
        try:
            meta = await remote(self.prefilter.lookup, crop_id)
        except UnknownCrop:
            await self.audit(caller, "view", 404, target=crop_id)
            raise
        url = await asyncio.to_thread(self.crop_links.link, meta.object_key, crop_id)
        await self.audit(caller, "view", target=crop_id, result_ids=[crop_id])
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})

    # -- cameras -----------------------------------------------------------------------------------
    @route("GET", "/v1/cameras", role="investigator",
           response_model=list[CameraInfo], responses=ERRORS)
    async def cameras(self, request: Request) -> list[CameraInfo]:
        """Cameras with indexed crops: how many, when last seen."""
        rows = await remote(self.prefilter.cameras)
        return [CameraInfo(camera=r["camera"], crops=r["crops"],
                           last_seen=datetime.fromtimestamp(r["last_seen"], UTC),
                           modalities=r["modalities"]) for r in rows]

    @route("GET", "/v1/cameras/{camera}/crops", role="investigator",
           response_model=list[CropInfo], responses=ERRORS)
    async def camera_crops(self, camera: str, request: Request,
                           limit: int = Query(24, ge=1, le=200)) -> list[CropInfo]:
        """A camera's most recent crops, newest first (to pick a query from)."""
        caller: Caller = request.state.caller
        metas = await remote(self.prefilter.recent, camera, limit)
        crops = [CropInfo(crop_id=m.crop_id, camera=m.camera, modality=m.modality,
                          capture_time=datetime.fromtimestamp(m.capture_time, UTC),
                          url=self._url(m.crop_id)) for m in metas]
        await self.audit(caller, "browse", target=camera, result_ids=[c.crop_id for c in crops])
        return crops

    # -- sessions ----------------------------------------------------------------------------------
    @route("POST", "/v1/sessions", role="investigator",
           response_model=SessionView, status_code=201, responses=ERRORS)
    async def create_session(self, payload: SessionCreate, request: Request) -> SessionView:
        """Start an investigation."""
        caller: Caller = request.state.caller
        session = await asyncio.to_thread(self.sessions.create, caller.key_id, payload)
        await self.audit(caller, "session.create", 201, target=session.session_id,
                         filters=payload.filters)
        return session.view(self.settings.console.idle_hours)

    @route("GET", "/v1/sessions", role="investigator",
           response_model=list[SessionSummary], responses=ERRORS)
    async def list_sessions(self, request: Request) -> list[SessionSummary]:
        """Your open (unexpired) sessions, most recently active first."""
        caller: Caller = request.state.caller
        sessions = await asyncio.to_thread(self.sessions.owned, caller.key_id)
        return [s.summary(self.settings.console.idle_hours) for s in sessions]

    @route("GET", "/v1/sessions/{session_id}", role="investigator",
           response_model=SessionView, responses=ERRORS)
    async def get_session(self, session_id: str, request: Request) -> SessionView:
        """The whole investigation: transcript, clues, confirmed sightings (timeline)."""
        caller: Caller = request.state.caller
        session = await self._session(caller, session_id)
        await self.audit(caller, "session.view", target=session_id,
                         result_ids=list(session.state().confirmed))
        return session.view(self.settings.console.idle_hours)

    @route("DELETE", "/v1/sessions/{session_id}", role="investigator",
           status_code=204, responses=ERRORS)
    async def delete_session(self, session_id: str, request: Request) -> Response:
        """Close an investigation and delete its turns and uploads."""
        caller: Caller = request.state.caller
        await self._session(caller, session_id)
        await asyncio.to_thread(self.sessions.delete, session_id)
        await self.audit(caller, "session.delete", 204, target=session_id)
        return Response(status_code=204)

    @route("POST", "/v1/sessions/{session_id}/search", role="investigator",
           response_model=SessionTurn, responses=ERRORS)
    async def search(self, session_id: str, payload: SearchTurn,
                     request: Request) -> SessionTurn:
        """One search turn: text, attributes and/or an image, on top of what the session
        already knows (confirmed crops join the query, rejected ones never come back)."""
        caller: Caller = request.state.caller
        await small_unless_image(request, bool(payload.image_b64), self.body_limits[0])
        session = await self._session(caller, session_id)
        image, upload = payload.crop_id, None
        if payload.image_b64:
            upload = decode_upload(payload.image_b64, self.settings.ingestor)  # 413/422 if bad
            image = UPLOAD + sha256_hex(upload)  # stored once the turn is (session unchanged)
        elif payload.crop_id:
            await remote(self.prefilter.lookup, payload.crop_id)  # 404 before it is recorded
        turn = SessionTurn(
            index=len(session.turns), at=datetime.now(UTC), actor=caller.key_id,
            action="search", text=payload.text, attributes=payload.attributes, image=image,
            changed_clothes=payload.changed_clothes or changed_clothes(payload.text)[0],
            filters=payload.filters)
        state = session.state()
        state.apply(turn)
        primary = state.anchors[0] if state.anchors else None
        upload_b64 = query_image = None  # the query's image, if an upload: validated already
        if primary and primary == image and upload is not None:
            upload_b64, query_image = payload.image_b64, upload
        elif primary and primary.startswith(UPLOAD):
            query_image = await asyncio.to_thread(self.sessions.get_upload, session_id, primary)
            if query_image is not None:
                upload_b64 = base64.b64encode(query_image).decode()
        query = state.query(payload, upload_b64=upload_b64)  # 422 past the query's limits
        try:
            response = await self.answer(query, query_image)
        except Exception as exc:
            await self.audit(caller, "session.search", getattr(exc, "status", 500),
                             target=session_id, query_kind=query.kind, filters=query.filters,
                             detail=str(getattr(exc, "code", type(exc).__name__)))
            raise
        turn.query_kind, turn.results = query.kind, response.results
        turn.vlm_calls, turn.model_version = response.vlm_calls, response.model_version
        await self.audit(caller, "session.search", target=session_id, query_kind=query.kind,
                         filters=query.filters, result_ids=[r.crop_id for r in turn.results])
        if upload is not None:
            await asyncio.to_thread(self.sessions.put_upload, session_id, upload)
        await asyncio.to_thread(self.sessions.append, session, turn)
        return turn

    @route("POST", "/v1/sessions/{session_id}/feedback", role="investigator",
           response_model=SessionView,
              responses=ERRORS)
    async def feedback(self, session_id: str, payload: Feedback,
                       request: Request) -> SessionView:
        """Confirm a result (it joins the query and the timeline) or reject it (it is
        excluded from every later search)."""
        caller: Caller = request.state.caller
        session = await self._session(caller, session_id)
        meta = await remote(self.prefilter.lookup, payload.crop_id)
        now = datetime.now(UTC)
        sighting = Sighting(crop_id=meta.crop_id, camera=meta.camera, modality=meta.modality,
                            capture_time=datetime.fromtimestamp(meta.capture_time, UTC),
                            url=self._url(meta.crop_id), confirmed_at=now)
        turn = SessionTurn(index=len(session.turns), at=now, actor=caller.key_id,
                           action=payload.verdict, crop_id=payload.crop_id, note=payload.note,
                           sighting=sighting if payload.verdict == "confirm" else None)
        await asyncio.to_thread(self.sessions.append, session, turn)
        await self.audit(caller, f"session.{payload.verdict}", target=session_id,
                         result_ids=[payload.crop_id])
        return session.view(self.settings.console.idle_hours)

    @route("POST", "/v1/sessions/{session_id}/explain", role="investigator",
           response_model=Explanation,
              responses=ERRORS)
    async def explain(self, session_id: str, payload: ExplainRequest,
                      request: Request) -> Explanation:
        """Why a result matched: the VLM's attribute comparison of the session's reference
        (its latest image, else its text clues) and the result, with the garment colours
        each side shows."""
        caller: Caller = request.state.caller
        session = await self._session(caller, session_id)
        meta = await remote(self.prefilter.lookup, payload.crop_id)
        state = session.state()
        primary = state.anchors[0] if state.anchors else None
        ref_crop = ref_bytes = None
        if primary and primary.startswith(UPLOAD):
            ref_bytes = await asyncio.to_thread(self.sessions.get_upload, session_id, primary)
        elif primary:
            ref_crop = primary
        text = "; ".join(state.clues + state.attributes) or None
        if ref_crop is None and ref_bytes is None and not text:
            raise UnknownCrop("the session has no image or text to compare with yet",
                              "session.empty_query")
        rows = await remote(self.prefilter.compare, payload.crop_id, ref_crop, ref_bytes, text)
        ref_key = (await remote(self.prefilter.lookup, ref_crop)).object_key if ref_crop else None
        rationale, version = await remote(self.rerank.explain, text, ref_key, ref_bytes,
                                          meta.object_key)
        explanation = Explanation(
            crop_id=payload.crop_id,
            reference=ref_crop or ("upload" if ref_bytes is not None else "text"),
            rationale=rationale or None,
            comparison=[AttributeComparison(**r) for r in rows], model_version=version)
        turn = SessionTurn(index=len(session.turns), at=datetime.now(UTC), actor=caller.key_id,
                           action="explain", crop_id=payload.crop_id, explanation=explanation)
        await asyncio.to_thread(self.sessions.append, session, turn)
        await self.audit(caller, "session.explain", target=session_id,
                         result_ids=[payload.crop_id])
        return explanation

    async def _session(self, caller: Caller, session_id: str) -> Session:
        return await asyncio.to_thread(self.sessions.load, session_id, caller.key_id)
