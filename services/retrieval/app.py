"""The application: ``Ingress.bind(Prefilter.bind(...), Rerank.bind(...))``, deployed from a
declarative config built from settings - the same schema ``serve deploy`` and KubeRay's
``RayService.serveConfigV2`` take, so what runs locally is what runs on a cluster.

A declarative redeploy that changes only the rerank ``user_config`` makes Serve call
``reconfigure`` in place, one replica at a time, while the others keep answering.

Two forms of the config: the local one (``chatreid serve``) carries the settings in ``args``
(without secrets: Ray logs the args; replicas fetch the secrets from the cluster's internal KV,
see ``chatreid.cluster.share``) and the resolved, verified checkpoint in ``user_config``; the
*portable* one (``chatreid serve --print-config``, and what the Helm chart's RayService
renders) carries neither settings nor a resolved event: replicas read settings from their pods'
environment and resolve the model reference (``latest``, a base name or a checkpoint version)
themselves.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.schema import ServeDeploySchema

from chatreid.cluster import redacted, serve_controller, share
from chatreid.config import Settings
from chatreid.query import ModelSpec

IMPORT_PATH = "services.retrieval.app:build_app"
# The environment of the local config's replicas: what they print stays in their log files and
# out of the terminal of whoever deployed them (Ray forwards a worker's stdout/stderr to the
# driver of its job). Serve's own lines, the per-request access log included, and whatever a
# replica prints go to Serve's replica log files only (<ray temp dir>/session_latest/logs/serve);
# model-loading progress bars (transformers' "Loading weights", the GGUF converter's plain tqdm,
# hub downloads) are off: redrawn bars are noise in a log file.
REPLICA_ENV = {
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


class DeployFailed(RuntimeError):
    """The application did not reach RUNNING with the config asked for."""


def build_app(args: dict[str, Any]):
    """Serve's application builder (``import_path`` of the deploy config)."""
    from services.retrieval.deployments import PrefilterDeployment, RerankDeployment
    from services.retrieval.ingress import Ingress
    from services.retrieval.shards import PrefilterShardDeployment

    # No settings in args (the portable config): every replica reads its pod's environment.
    # Otherwise they come without secrets; replicas fetch those from the cluster (unshare).
    settings = args.get("settings")
    n = shard_count(settings)
    shards = [PrefilterShardDeployment.options(name=shard_name(i)).bind(settings, i)
              for i in range(n)] if n > 1 else []  # one shard: the Prefilter holds it all
    return Ingress.bind(PrefilterDeployment.bind(settings, *shards),
                        RerankDeployment.bind(settings), settings)


def shard_count(settings: dict | None) -> int:
    """``index.shards`` from the args' settings, or (portable config) the pod's environment;
    one shard deploys none: the Prefilter deployment holds the whole index."""
    return (Settings.model_validate(settings) if settings else Settings()).index.shards


def secrets_name(settings: Settings) -> str:
    return f"serve-{settings.serve.app_name}"


def rerank_options(settings: Settings, spec: ModelSpec | None,
                   portable: bool = False) -> dict[str, Any]:
    cfg = settings.serve
    model = cfg.model if portable else spec.model_dump(mode="json") if spec else None
    options: dict[str, Any] = {
        "name": "Rerank",
        "user_config": {"model": model},
        "max_ongoing_requests": cfg.rerank_max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.rerank_num_cpus,
                              **({"num_gpus": cfg.rerank_num_gpus} if cfg.rerank_num_gpus else {})},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 120,  # a replica finishes its dialogues before it stops
    }
    if cfg.rerank_autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": cfg.rerank_min_replicas, "max_replicas": cfg.rerank_max_replicas,
            "target_ongoing_requests": cfg.rerank_target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.rerank_replicas
    return options


def shard_name(index: int) -> str:
    """The deployment of prefilter shard ``index`` (``services.retrieval.shards``)."""
    return f"PrefilterShard{index}"


def shard_options(settings: Settings) -> list[dict[str, Any]]:
    """The shard deployments (none for one shard): each as many replicas as the Prefilter
    tier; a shard holds 1/N of the index, so its memory is what its node must have. With
    ``serve.prefilter_shard_resource`` a replica asks one unit of that Ray custom resource
    instead of CPUs: it runs only where the resource is offered (the Helm chart's
    ``prefilter`` worker group, one unit per pod)."""
    n, cfg = settings.index.shards, settings.serve
    resource = cfg.prefilter_shard_resource

    def actor() -> dict[str, Any]:  # a fresh dict each: YAML output without anchors
        if resource:
            return {"num_cpus": 0.0, "resources": {resource: 1.0}}
        return {"num_cpus": cfg.light_num_cpus}

    return [{"name": shard_name(i), "num_replicas": cfg.prefilter_replicas,
             "ray_actor_options": actor(),
             "health_check_period_s": 10} for i in range(n)] if n > 1 else []


def deploy_config(settings: Settings, spec: ModelSpec | None = None, *,
                  portable: bool = False) -> dict[str, Any]:
    """The whole desired state of the retrieval application as a plain dict (YAML-able).
    ``portable``: no settings in ``args`` and the model as its reference (module docstring);
    nor the replicas' environment (:data:`REPLICA_ENV`): a pod's output is its log already."""
    cfg = settings.serve
    def light() -> dict[str, float]:  # a fresh dict each: YAML output without anchors
        return {"num_cpus": cfg.light_num_cpus}

    local = {} if portable else {"runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    return {
        "http_options": {"host": cfg.http_host, "port": cfg.http_port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": IMPORT_PATH,
            "args": {} if portable else {"settings": redacted(settings, secrets_name(settings))[0]},
            **local,
            "deployments": [
                {"name": "Ingress", "num_replicas": cfg.ingress_replicas,
                 "ray_actor_options": light()},
                {"name": "Prefilter", "num_replicas": cfg.prefilter_replicas,
                 "ray_actor_options": light(), "health_check_period_s": 10},
                *shard_options(settings),
                rerank_options(settings, spec, portable),
            ],
        }],
    }


def deploy(settings: Settings, spec: ModelSpec | None, *, wait: bool = True,
           timeout_s: float | None = None) -> None:
    """Apply the config (Serve starts on the connected Ray if needed); with ``wait``, return
    once the application RUNS this config, else raise :class:`DeployFailed`."""
    from ray import serve

    config = ServeDeploySchema.model_validate(deploy_config(settings, spec))
    serve.start(http_options=config.http_options.model_dump())
    client = serve_controller()
    share(settings, secrets_name(settings))  # before any replica starts
    port = client.http_config.port
    if port != settings.serve.http_port:  # Serve keeps the port it first started with
        raise DeployFailed(f"Serve on this Ray cluster already listens on port {port}, not "
                           f"{settings.serve.http_port}: set CHATREID_SERVE__HTTP_PORT={port} "
                           "or run `serve shutdown` first")
    started = time.time()
    client.deploy_apps(config)
    if wait:
        wait_running(settings, started, timeout_s or settings.serve.rollout_timeout_s)


def wait_running(settings: Settings, since: float, timeout_s: float) -> None:
    from ray import serve

    name, deadline = settings.serve.app_name, time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.last_deployed_time_s >= since - 1:
            if app.status == "RUNNING":
                return
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployFailed(_why(app))
        if time.monotonic() > deadline:
            raise DeployFailed(f"{name} not running after {timeout_s:.0f}s"
                               + (f": {_why(app)}" if app else ""))
        time.sleep(0.5)


def _why(app) -> str:
    parts = [app.message] + [f"{n}: {d.message}" for n, d in app.deployments.items()
                             if d.message]
    return "; ".join(p for p in parts if p) or str(app.status)


def undeploy(settings: Settings) -> None:
    from ray import serve

    serve.delete(settings.serve.app_name)
