"""Joining Ray, the one way every job and the data engine do it."""

from __future__ import annotations

import os

import ray
from pyarrow import fs

from chatreid.config import Settings
from chatreid.stack import LocalStack

# Worker processes must not prompt for Ray's token auth on a loopback dev cluster.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


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


