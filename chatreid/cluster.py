"""Joining Ray, the one way every job and the data engine do it."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import secrets
from typing import Any

import ray
from pyarrow import fs

from chatreid.config import Settings, reveal, secret_paths
from chatreid.local_head import LOOPBACK_RAY_ENV, LocalHead, is_loopback

log = logging.getLogger(__name__)
# Worker lines kept out of the terminal (they stay in Ray's session logs). Ray Train's
# placement-group cleaner asks the State API, which runs in the dashboard (off on these
# clusters), whether the run's controller lives, and warns every second that it cannot.
QUIET_WORKER_LINES = r"Failed to query Ray Train Controller actor state"
# Settings that are secrets (typed SecretStr): never part of a config Ray logs or a job persists.
SECRETS = tuple(secret_paths())
_KV_NAMESPACE = "chatreid"
_REF = "secrets_ref"


def redacted(settings: Settings, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings as a plain dict with the secrets left out (a reference ``name`` in their
    place), and the secrets. Pure: :func:`share` also stores the secrets on the cluster."""
    data = settings.model_dump(mode="json")  # a SecretStr dumps masked; None below
    secrets = {f"{s}.{f}": value for s, f in SECRETS
               if (value := reveal(getattr(getattr(settings, s), f)))}
    for section, field in SECRETS:
        data[section][field] = None
    if secrets:
        data[_REF] = name
    return data, secrets


def share(settings: Settings, name: str) -> dict[str, Any]:
    """Settings for processes elsewhere on the cluster (Serve replicas, Ray Train workers):
    the secrets go to Ray's internal KV under ``name``, which is neither logged nor saved with
    a job's config, and :func:`unshare` puts them back. Needs a Ray connection."""
    data, secrets = redacted(settings, name)
    if secrets:
        _kv_put(f"secrets/{name}", json.dumps(secrets).encode())
    return data


def unshare(data: dict[str, Any] | None) -> Settings:
    """The settings :func:`share` sent, secrets restored; None: this process's environment."""
    if not data:
        return Settings()
    data = copy.deepcopy(data)
    name = data.pop(_REF, None)
    if name:
        raw = _kv_get(f"secrets/{name}")
        if raw is None:
            raise RuntimeError(f"the secrets of {name!r} are not on this Ray cluster")
        for key, value in json.loads(raw).items():
            section, field = key.split(".")
            data[section][field] = value
    return Settings.model_validate(data)


# Ray has no public key-value API (2.60). Its internal KV (in the GCS, readable by the cluster's
# processes only, never logged nor saved with a job or an actor's arguments) is what Ray's own
# libraries keep cluster-scoped state in; these two functions are the only use of it here.
def _kv_put(key: str, value: bytes) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=_KV_NAMESPACE)


def _kv_get(key: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=_KV_NAMESPACE)


def serve_controller() -> Any:
    """Ray Serve's controller client: deploys a whole Serve config (``deploy_apps``) and reads
    it back (``get_serve_details``). Ray 2.60 has no public Python API for either (`serve
    deploy` goes through the dashboard's REST API, which these clusters run without, and Ray's
    own `serve run config.yaml` uses this client); the one private Serve API used here. Serve
    must be running (``serve.start``)."""
    from ray.serve.context import _get_global_client

    return _get_global_client()


def connect(settings: Settings, log_to_driver: bool = True) -> None:
    """Join the configured cluster, else the local stack's head, else start Ray in-process.

    Ray token auth is on everywhere: a configured cluster is joined with the token in
    ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``, or ``ray.auth_token``), the local stack's
    head with the one `chatreid up` generated (``ray.auth_token``), and an in-process Ray gets a
    token made up for this process. The last two also listen on 127.0.0.1 only.

    Args:
        log_to_driver (bool, default True): Ray prints the stdout/stderr of this job's workers
            here, prefixed with the actor or task (e.g. the ``[stage N] step ...`` lines of
            `chatreid train`'s workers). False for a command whose workers are services (the
            demo's Serve replicas and proxies): their lines stay in Ray's session logs
            (``<ray temp dir>/session_latest/logs``). Only the first connect of a process
            decides."""
    if ray.is_initialized():
        return
    _quiet_worker_lines()
    address = settings.ray.address
    head = LocalHead(settings)
    if address is None and settings.ray.join_local_head and head.healthy():
        head.check_loopback()
        _loopback_only()
        token = head.token()
        if token:
            _use_token(token)
        ray.init(address=f"127.0.0.1:{settings.stack.ray_port}",
                 log_to_driver=log_to_driver)
        return
    if address is not None:
        _join(address, reveal(settings.ray.auth_token), log_to_driver)
        return
    settings.ray.temp_dir.mkdir(parents=True, exist_ok=True)
    _loopback_only()  # inherited by its raylet and so by every worker, as is the token
    _use_token(secrets.token_hex(32))
    ray.init(
        address="local",  # never a stale head recorded in Ray's temp dir
        num_cpus=settings.ray.num_cpus,
        include_dashboard=False,
        _temp_dir=str(settings.ray.temp_dir),
        log_to_driver=log_to_driver,
    )


def _quiet_worker_lines() -> None:
    """Drop :data:`QUIET_WORKER_LINES` from the worker output Ray prints here, beside any
    ``RAY_DEDUP_LOGS_SKIP_REGEX`` of the user's. Ray reads that variable once, when it is
    imported, into its two log deduplicators, so they get the pattern directly (private
    Ray API, like :func:`_ray_reread_environment`)."""
    from ray._private import ray_logging

    own = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    pattern = re.compile(f"(?:{own})|(?:{QUIET_WORKER_LINES})" if own else QUIET_WORKER_LINES)
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        dedup.skip_re = pattern


def _loopback_only() -> None:
    os.environ.update(LOOPBACK_RAY_ENV)
    _ray_reread_environment(loopback=True)  # its child processes read the variable themselves


def _use_token(token: str) -> None:
    """Token auth with ``token`` for this process and the Ray processes it starts."""
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    _ray_reread_environment()


def _ray_reread_environment(loopback: bool = False) -> None:
    """Make Ray in this process see the RAY_* variables just set. Ray reads them once, when it
    is imported (its config, the auth mode and token, whether it may run as a cluster), which
    here happened before the settings said what to join; Ray 2.60 has no public API to re-read
    them (Ray's docs: set them before starting), hence the only private Ray core calls here."""
    from ray._private import ray_constants
    from ray._raylet import (  # compiled: no stubs
        AuthenticationTokenLoader,  # pyright: ignore[reportAttributeAccessIssue]
        Config,  # pyright: ignore[reportAttributeAccessIssue]
    )

    if loopback:
        ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")  # re-reads RAY_AUTH_MODE and the rest of Ray's config
    AuthenticationTokenLoader.instance().reset_cache()


def _join(address: str, token: str | None, log_to_driver: bool = True) -> None:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if is_loopback(host):
        _loopback_only()  # else Ray rewrites 127.0.0.1 to the machine's address
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if not has_token and token:
        _use_token(token)
        has_token = True
    elif has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        _ray_reread_environment()
    if os.environ.get("RAY_AUTH_MODE") == "disabled" and not is_loopback(host):
        log.warning("RAY_AUTH_MODE=disabled toward %s: whoever reaches that cluster runs code "
                    "and reads its secrets; give it a token (RAY_AUTH_TOKEN)", address)
    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except ConnectionError as exc:
        if has_token:
            raise
        raise ConnectionError(f"{exc}. If the cluster uses token auth (the Helm chart's and "
                              "docker-compose's do), set RAY_AUTH_TOKEN to its token") from exc


def storage_filesystem(settings: Settings) -> fs.S3FileSystem:
    s3 = settings.s3
    access_key, secret_key = s3.credentials()
    return fs.S3FileSystem(
        endpoint_override=s3.endpoint,
        scheme="https" if s3.secure else "http",
        access_key=access_key,
        secret_key=secret_key,
        region=s3.region or "us-east-1",
    )


