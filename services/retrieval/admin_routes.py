"""Admin routes (role ``admin``: keys, audit export, erasure, retention) and operator routes
(role ``operator``: status, rollout, scale, training). Each action is audited."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

from fastapi import Query, Request
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from chatreid.access import AccessControlOff, Caller
from chatreid.checkpoints import find as find_checkpoint
from chatreid.checkpoints import force as force_rollout
from chatreid.errors import BadQuery
from chatreid.sessions import UPLOAD
from chatreid.tuning.presets import PRESETS
from schemas.api import as_utc
from schemas.console import (
    PURGE_DAYS_MAX,
    PURGE_DAYS_MIN,
    ApiKeyCreate,
    ApiKeyInfo,
    ApiKeyIssued,
    AuditEntry,
    ErasureReport,
    ErasureRequest,
    OpsStatus,
    RetentionReport,
    RolloutRequest,
    ScaleRequest,
    TrainRequest,
    TrainRun,
)
from services.retrieval import ops
from services.retrieval.deployments import model_spec
from services.retrieval.http import ERRORS, Gate, remote, route


class AdminRoutes(Gate):
    prefilter: DeploymentHandle  # set by the Ingress deployment these routes are mixed into

    @route("POST", "/v1/admin/keys", role="admin",
           response_model=ApiKeyIssued, status_code=201, responses=ERRORS)
    async def issue_key(self, payload: ApiKeyCreate, request: Request) -> ApiKeyIssued:
        """Issue a key with roles; its secret is in this response only. Refused (409
        ``access.insecure``) while access control is off: anyone could mint it."""
        caller: Caller = request.state.caller
        try:
            issued = await asyncio.to_thread(self.keys.issue, payload, caller.key_id)
        except AccessControlOff as exc:
            await self.audit(caller, "key.create", exc.status, detail=exc.code)
            raise
        await self.audit(caller, "key.create", 201, target=issued.key_id,
                         detail=f"roles={','.join(issued.roles)}")
        return issued

    @route("GET", "/v1/admin/keys", role="admin", response_model=list[ApiKeyInfo], responses=ERRORS)
    async def list_keys(self, request: Request) -> list[ApiKeyInfo]:
        return await asyncio.to_thread(self.keys.list)

    @route("DELETE", "/v1/admin/keys/{key_id}", role="admin",
           response_model=ApiKeyInfo, responses=ERRORS)
    async def revoke_key(self, key_id: str, request: Request) -> ApiKeyInfo:
        """Revoke a key (every replica refuses it within ``access.cache_s``)."""
        caller: Caller = request.state.caller
        info = await asyncio.to_thread(self.keys.revoke, key_id, caller.key_id)
        await self.audit(caller, "key.revoke", target=key_id)
        return info

    @route("GET", "/v1/admin/audit", role="admin",
           response_model=list[AuditEntry], responses=ERRORS)
    async def export_audit(self, request: Request, since: datetime | None = None,
                           until: datetime | None = None, actor: str | None = None,
                           action: str | None = None,
                           format: str = Query("json", pattern="^(json|jsonl)$")):
        """Export audit entries in time order (``format=jsonl`` streams JSON lines). The log
        is append-only: no route changes or deletes an entry. Times without a zone are UTC."""
        caller: Caller = request.state.caller
        try:
            since, until = as_utc(since), as_utc(until)
        except ValueError as exc:
            raise BadQuery(str(exc)) from None
        if since and until and since > until:
            raise BadQuery("since is after until")
        entries = await asyncio.to_thread(
            lambda: list(self.audit_log.export(since, until, actor, action)))
        await self.audit(caller, "audit.export", detail=f"{len(entries)} entries")
        if format == "jsonl":
            lines = (e.model_dump_json() + "\n" for e in entries)
            return StreamingResponse(lines, media_type="application/x-ndjson")
        return entries

    @route("POST", "/v1/admin/erasure", role="admin",
           response_model=ErasureReport, responses=ERRORS)
    async def erase(self, payload: ErasureRequest, request: Request) -> ErasureReport:
        """Right to erasure: remove every confirmed crop of a session (the identity the
        investigator established) and/or the crops named, from storage and every index;
        the session's uploaded images go too."""
        caller: Caller = request.state.caller
        crop_ids = list(payload.crop_ids)
        if payload.session_id:
            session = await asyncio.to_thread(self.sessions.load, payload.session_id)
            state = session.state()
            crop_ids += list(state.confirmed) + [a for a in state.images
                                                 if not a.startswith(UPLOAD)]
        request_id = uuid.uuid4().hex
        out = await remote(self.prefilter.erase, crop_ids, "erasure", request_id)
        deleted = out["objects_deleted"]
        if payload.session_id:
            deleted += await asyncio.to_thread(self.sessions.drop_uploads, payload.session_id)
        report = ErasureReport(erased=out["erased"], unknown=out["unknown"],
                               objects_deleted=deleted, at=datetime.now(UTC))
        await self.audit(caller, "erasure", target=payload.session_id or request_id,
                         result_ids=report.erased, detail=payload.reason)
        return report

    @route("POST", "/v1/admin/retention/purge", role="admin",
           response_model=RetentionReport, responses=ERRORS)
    async def purge(self, request: Request, days: float | None = Query(
            None, ge=PURGE_DAYS_MIN, le=PURGE_DAYS_MAX, allow_inf_nan=False,
            description="crops captured more than this many days ago (1 hour to 100 years); "
            "default retention.crop_days")) -> RetentionReport:
        """Purge crops and vectors older than ``days`` (default ``retention.crop_days``) and
        expired sessions, now (the scheduled job does the same)."""
        caller: Caller = request.state.caller
        days = days or self.settings.retention.crop_days
        if days is None:
            raise BadQuery("retention is off (retention.crop_days is unset): give days")
        if not PURGE_DAYS_MIN <= days <= PURGE_DAYS_MAX:  # a misconfigured crop_days too
            raise BadQuery(f"days must lie between {PURGE_DAYS_MIN:.4f} (1 hour) and "
                           f"{PURGE_DAYS_MAX:g} (100 years)")
        cutoff = datetime.now(UTC) - timedelta(days=days)
        out = await remote(self.prefilter.purge, cutoff)
        sessions = await asyncio.to_thread(self.sessions.purge_expired)
        report = RetentionReport(cutoff=cutoff, crops_erased=out["crops_erased"],
                                 objects_deleted=out["objects_deleted"],
                                 sessions_deleted=sessions, at=datetime.now(UTC))
        await self.audit(caller, "retention.purge", detail=report.model_dump_json(
            include={"cutoff", "crops_erased", "objects_deleted", "sessions_deleted"}))
        return report


class OpsRoutes(Gate):
    prefilter: DeploymentHandle  # both set by the Ingress deployment, as for AdminRoutes
    rerank: DeploymentHandle

    @route("GET", "/v1/ops/status", role="operator", response_model=OpsStatus, responses=ERRORS)
    async def ops_status(self, request: Request) -> OpsStatus:
        """The application's deployments and replicas, the model served, the gallery."""
        state = await asyncio.to_thread(ops.status, self.settings)
        health = await remote(self.prefilter.status)
        return OpsStatus(**state, model_version=await remote(self.rerank.version),
                         gallery=health["gallery"], embedder_version=health["embedder_version"])

    @route("POST", "/v1/ops/rollout", role="operator",
           response_model=OpsStatus, status_code=202, responses=ERRORS)
    async def rollout(self, payload: RolloutRequest, request: Request) -> OpsStatus:
        """Roll the rerank replicas to a model (one at a time; each verifies and smoke-tests
        it before serving). An unknown version is refused here, before anything changes, and
        so is a checkpoint the rollout gate refused (409 ``gate.refused``, with its figures).

        With ``force`` and a ``reason``: override the gate for one checkpoint (``kind``: vlm or
        embedder) - it is announced again, forced, and the rollout watchers (``chatreid
        serve`` following ``latest``, the embedding service) roll it with its figures still
        reported. Audited as ``checkpoint.force``."""
        caller: Caller = request.state.caller
        if payload.force:
            return await self._force(payload, caller, request)
        try:
            spec = await asyncio.to_thread(model_spec, self.settings, payload.model)
        except (ValueError, LookupError) as exc:
            raise BadQuery(str(exc), "model.unknown") from None
        if self.settings.gate.enabled and spec is not None and spec.event is not None:
            refusal = await asyncio.to_thread(ops.gate_refusal, self.settings, "vlm",
                                              spec.version)
            if refusal is not None:
                await self.audit(caller, "ops.rollout", ops.GateRefused.status,
                                 target=payload.model, detail="gate.refused")
                raise ops.GateRefused(
                    f"the rollout gate refused {spec.version}: {refusal.reason}; reranked "
                    f"{_figures(refusal.candidate)} vs prefilter alone "
                    f"{_figures(refusal.serving)}. To roll it anyway, send force: true with a "
                    "reason (audited)")
        await asyncio.to_thread(ops.redeploy, self.settings, model=payload.model)
        await self.audit(caller, "ops.rollout", 202, target=payload.model)
        return await self.ops_status(request)

    async def _force(self, payload: RolloutRequest, caller: Caller,
                     request: Request) -> OpsStatus:
        found = await asyncio.to_thread(find_checkpoint, self.settings, payload.kind,
                                        payload.model)
        if found is None:
            raise BadQuery(f"no complete {payload.kind} checkpoint {payload.model!r} (chatreid "
                           f"checkpoints --model {payload.kind} lists them)",
                           "checkpoint.unknown")
        # audited before it takes effect: an override never goes unaudited
        await self.audit(caller, "checkpoint.force", 202,
                         target=f"{payload.kind}:{payload.model}", detail=payload.reason)
        try:
            await asyncio.to_thread(force_rollout, self.settings, payload.kind, payload.model,
                                    by=f"{caller.name} ({caller.key_id})",
                                    reason=payload.reason or "")
        except LookupError as exc:
            raise BadQuery(str(exc), "checkpoint.unknown") from None
        return await self.ops_status(request)

    @route("POST", "/v1/ops/scale", role="operator",
           response_model=OpsStatus, status_code=202, responses=ERRORS)
    async def scale(self, payload: ScaleRequest, request: Request) -> OpsStatus:
        """Set the number of rerank replicas (turns replica autoscaling off)."""
        caller: Caller = request.state.caller
        await asyncio.to_thread(ops.redeploy, self.settings, replicas=payload.replicas)
        await self.audit(caller, "ops.scale", 202, target="Rerank",
                         detail=f"replicas={payload.replicas}")
        return await self.ops_status(request)

    @route("POST", "/v1/ops/train", role="operator",
           response_model=TrainRun, status_code=202, responses=ERRORS)
    async def train(self, payload: TrainRequest, request: Request) -> TrainRun:
        """Start a training run on the cluster (the embedder, an HPT stage, or all); its
        checkpoints are pushed and rolled out like `chatreid train`'s."""
        caller: Caller = request.state.caller
        if payload.preset not in PRESETS:
            raise BadQuery(f"unknown preset {payload.preset!r}; presets: {sorted(PRESETS)}")
        ref = await asyncio.to_thread(ops.start_training, self.settings, payload.target,
                                      payload.preset)  # no secret in the actor's arguments
        run = await ref
        await self.audit(caller, "ops.train", 202, target=run["run_id"],
                         detail=json.dumps({"target": payload.target, "preset": payload.preset}))
        return TrainRun.model_validate(run)

    @route("GET", "/v1/ops/train/{run_id}", role="operator",
           response_model=TrainRun, responses=ERRORS)
    async def train_run(self, run_id: str, request: Request) -> TrainRun:
        run = await ops.training_runs(self.settings).get.remote(run_id)
        if run is None:
            raise ops.UnknownRun(f"no training run {run_id!r}")
        return TrainRun.model_validate(run)


def _figures(figures: dict[str, float]) -> str:
    """``gate/mAP`` (and rank-1) as the refusal carries them, for a message."""
    if "gate/mAP" not in figures:
        return "(no figures)"
    return f"mAP {figures['gate/mAP']:.4f}, rank-1 {figures.get('gate/rank1', float('nan')):.4f}"
