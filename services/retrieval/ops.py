"""Operator actions behind ``/v1/ops``: what the running application serves, a rollout to a
model version, rerank scaling, and training runs started on the cluster.

A rollout or a scale is a declarative redeploy of the *current* Serve config with only the
Rerank deployment changed (Serve then reconfigures or adds replicas one at a time; the
ingress and prefilter are untouched, so this request's replica keeps running). Training runs
go to a detached actor on the same Ray cluster, so a run outlives the request and any ingress
replica; ``chatreid train`` does the same work from a shell. The settings it gets carry no
secret (``chatreid.cluster.share``: actor arguments are kept by Ray); the actor fetches them
from the cluster's internal KV (``unshare``), as Serve replicas and Train workers do.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import ray
from ray import serve

from chatreid.cluster import serve_controller, share, unshare
from chatreid.config import Settings
from chatreid.errors import OpsError

TRAINER_NAME = "chatreid-training-runs"


class OpsUnavailable(OpsError):
    status, code = 503, "ops.unavailable"


class GateRefused(OpsError):
    status, code = 409, "gate.refused"


class UnknownRun(OpsError):
    status, code = 404, "run.unknown"


def gate_refusal(settings: Settings, kind: str, version: str):
    """The rollout gate's standing refusal of checkpoint ``version`` of ``kind``: its latest
    rollout step on ``deployments`` when that is a refusal, else None."""
    from chatreid.evaluation.gate import rollout_steps

    try:
        step = rollout_steps(settings, kind).get(version)
    except TimeoutError as exc:
        raise OpsUnavailable(f"the rollout gate's verdicts cannot be read now: {exc}") from None
    return step if step is not None and step.status == "refused" else None


def current_config() -> dict[str, Any]:
    """Every application's deployed config (``deploy_apps`` replaces all of them)."""
    details = serve_controller().get_serve_details()
    apps = [a["deployed_app_config"] for a in details.get("applications", {}).values()
            if a.get("deployed_app_config")]
    if not apps:
        raise OpsUnavailable("no application was deployed from a config")
    http = {k: v for k, v in (details.get("http_options") or {}).items()
            if k in ("host", "port")}
    return {"http_options": http, "applications": apps}


def _rerank(config: dict[str, Any], app_name: str) -> dict[str, Any]:
    app = next((a for a in config["applications"] if a["name"] == app_name), None)
    if app is None:
        raise OpsUnavailable(f"application {app_name!r} is not deployed")
    for dep in app.setdefault("deployments", []):
        if dep["name"] == "Rerank":
            return dep
    dep = {"name": "Rerank"}
    app["deployments"].append(dep)
    return dep


def redeploy(settings: Settings, *, model: str | None = None,
             replicas: int | None = None) -> dict[str, Any]:
    """Apply the current config with the Rerank model reference and/or replica count changed;
    returns the Rerank deployment's new options. Does not wait (replicas roll one by one)."""
    from ray.serve.schema import ServeDeploySchema

    config = current_config()
    rerank = _rerank(config, settings.serve.app_name)
    if model is not None:
        rerank["user_config"] = {**(rerank.get("user_config") or {}), "model": model}
    if replicas is not None:
        rerank.pop("autoscaling_config", None)
        rerank["num_replicas"] = replicas
    serve_controller().deploy_apps(ServeDeploySchema.model_validate(config))
    return rerank


def status(settings: Settings) -> dict[str, Any]:
    app = serve.status().applications.get(settings.serve.app_name)
    if app is None:
        raise OpsUnavailable(f"application {settings.serve.app_name!r} is not deployed")
    replicas = {name: sum(d.replica_states.values()) for name, d in app.deployments.items()}
    try:
        model = _rerank(current_config(), settings.serve.app_name).get("user_config", {})
        reference = model.get("model")
        model_ref = reference if isinstance(reference, str) or reference is None else \
            _spec_version(reference)
    except OpsUnavailable:
        model_ref = None
    return {"app_status": _name(app.status),
            "deployments": {n: _name(d.status) for n, d in app.deployments.items()},
            "replicas": replicas, "model": model_ref}


def _name(status) -> str:
    return str(getattr(status, "value", status))


def _spec_version(spec: dict) -> str | None:
    from chatreid.query import ModelSpec

    try:
        return ModelSpec.model_validate(spec).version
    except ValueError:
        return None


@ray.remote(num_cpus=0)
class TrainingRuns:
    """Runs ``chatreid train`` work in threads of a detached actor and remembers outcomes."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def start(self, settings: dict, target: str, preset: str) -> dict[str, Any]:
        """``settings``: from :func:`chatreid.cluster.share` (no secrets in them)."""
        run = {"run_id": f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
               "target": target, "preset": preset, "state": "running",
               "started_at": datetime.now(UTC).isoformat(), "finished_at": None,
               "detail": None}
        with self.lock:
            self.runs[run["run_id"]] = run
        threading.Thread(target=self._run, args=(run, settings), daemon=True).start()
        return dict(run)

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self.lock:
            run = self.runs.get(run_id)
            return dict(run) if run else None

    def _run(self, run: dict[str, Any], settings: dict) -> None:
        from rich.console import Console

        from chatreid.tuning.presets import PRESETS
        from ray_jobs.train import train

        try:
            report = train(unshare(settings), run["target"],
                           recipe=PRESETS[run["preset"]], console=Console(quiet=True))
            versions = [s.version for s in report.stages]
            if report.embedder is not None:
                versions.insert(0, report.embedder.version)
            state, detail = "succeeded", "pushed " + (", ".join(versions) or "nothing")
        except Exception as exc:  # a failed run is reported, not raised into the actor
            state, detail = "failed", f"{type(exc).__name__}: {exc}"
        with self.lock:
            run.update(state=state, detail=detail[:2000],
                       finished_at=datetime.now(UTC).isoformat())


def training_runs(settings: Settings):
    """The cluster's one training-runs actor (created on first use, survives the caller)."""
    namespace = f"chatreid-{settings.serve.app_name}"
    return TrainingRuns.options(name=TRAINER_NAME, namespace=namespace, lifetime="detached",
                                get_if_exists=True).remote()


def start_training(settings: Settings, target: str, preset: str) -> ray.ObjectRef:
    """Start a run on the training-runs actor; the run's record (an ObjectRef). The settings
    travel without their secrets, which go to the cluster's KV under this app's name."""
    shared = share(settings, f"ops-train-{settings.serve.app_name}")
    return training_runs(settings).start.remote(shared, target, preset)
