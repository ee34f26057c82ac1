"""Joining Ray, the one way every job and the data engine do it."""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
from typing import Any

import ray
from pyarrow import fs

from chatreid.app.stack import LOOPBACK_RAY_ENV, RAY_TOKEN_VAR, LocalStack, is_loopback
from chatreid.config import Settings

log = logging.getLogger(__name__)
# Settings that are secrets: never part of a config Ray logs or a job persists.
SECRETS = (("serve", "api_key"), ("s3", "secret_key"), ("kafka", "sasl_password"),
           ("ray", "auth_token"))
_KV_NAMESPACE = "chatreid"
_REF = "secrets_ref"


def redacted(settings: Settings, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings as a plain dict with the secrets left out (a reference ``name`` in their
    place), and the secrets. Pure: :func:`share` also stores the secrets on the cluster."""
    data = settings.model_dump(mode="json")
    secrets = {f"{s}.{f}": data[s][f] for s, f in SECRETS if data[s].get(f)}
    for key in secrets:
        section, field = key.split(".")
        data[section][field] = None
    if secrets:
        data[_REF] = name
    return data, secrets


def share(settings: Settings, name: str) -> dict[str, Any]:
    """Settings for processes elsewhere on the cluster (Serve replicas, Ray Train workers):
    the secrets go to Ray's internal KV under ``name``, which is neither logged nor saved with
    a job's config, and :func:`unshare` puts them back. Needs a Ray connection."""
    from ray.experimental.internal_kv import _internal_kv_put

    data, secrets = redacted(settings, name)
    if secrets:
        _internal_kv_put(f"secrets/{name}", json.dumps(secrets).encode(), overwrite=True,
                         namespace=_KV_NAMESPACE)
    return data


def unshare(data: dict[str, Any] | None) -> Settings:
    """The settings :func:`share` sent, secrets restored; None: this process's environment."""
    if not data:
        return Settings()
    data = copy.deepcopy(data)
    name = data.pop(_REF, None)
    if name:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(f"secrets/{name}", namespace=_KV_NAMESPACE)
        if raw is None:
            raise RuntimeError(f"the secrets of {name!r} are not on this Ray cluster")
        for key, value in json.loads(raw).items():
            section, field = key.split(".")
            data[section][field] = value
    return Settings.model_validate(data)


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
    address = settings.ray.address
    stack = LocalStack(settings)
    if address is None and settings.ray.join_local_head and stack.ray_healthy():
        stack.check_ray_loopback()
        _loopback_only()
        token = settings.ray.auth_token or stack.stored(RAY_TOKEN_VAR)
        if token:
            _use_token(token)
        ray.init(address=f"127.0.0.1:{settings.stack.ray_port}",
                 log_to_driver=log_to_driver)
        return
    if address is not None:
        _join(address, settings.ray.auth_token, log_to_driver)
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


def _loopback_only() -> None:
    for key, value in LOOPBACK_RAY_ENV.items():
        os.environ[key] = value
    # Ray read it when imported (before this ran); its child processes read the env var
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _use_token(token: str) -> None:
    """Token auth with ``token`` for this process and the Ray processes it starts."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    Config.initialize("")  # Ray cached the mode when imported
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
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # RAY_AUTH_MODE=token, and Ray's config (read at import) reloaded
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


