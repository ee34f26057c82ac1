"""Joining Ray, the one way every job and the data engine do it."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import ray
from pyarrow import fs

from chatreid.config import Settings
from chatreid.stack import LocalStack

# Worker processes must not prompt for Ray's token auth on a loopback dev cluster.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
# Settings that are secrets: never part of a config Ray logs or a job persists.
SECRETS = (("serve", "api_key"), ("s3", "secret_key"), ("kafka", "sasl_password"))
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


def connect(settings: Settings) -> None:
    """Join the configured cluster, else the local stack's head, else start Ray in-process."""
    if ray.is_initialized():
        return
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = settings.ray.address
    if address is None and settings.ray.join_local_head and LocalStack(settings).ray_healthy():
        address = "auto"
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return
    settings.ray.temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",  # never a stale head recorded in Ray's temp dir
        num_cpus=settings.ray.num_cpus,
        include_dashboard=False,
        _temp_dir=str(settings.ray.temp_dir),
        runtime_env={"env_vars": dict(RAY_ENV)},
    )


def storage_filesystem(settings: Settings) -> fs.S3FileSystem:
    s3 = settings.s3
    return fs.S3FileSystem(
        endpoint_override=s3.endpoint,
        scheme="https" if s3.secure else "http",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region or "us-east-1",
    )


