"""One way to run a Ray Train job: connect, point run state at the object store, fit.

Every training job (the three HPT stages, the prefilter embedder) goes through
:func:`run_trainer`, so scale, fault tolerance and storage behave the same everywhere:

* run state and resumable checkpoints live in the project bucket under
  ``<train.storage_prefix>/<run name>`` (pyarrow S3 against MinIO/SeaweedFS), so a job re-run
  with the same name resumes from the bucket, and a failed worker restarts from the last
  reported checkpoint (``FailureConfig(max_failures)``);
* workers get the settings as a plain dict and rebuild them (clients never cross processes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from chatreid.cluster import connect, share, storage_filesystem, unshare
from chatreid.config import Settings
from chatreid.storage import ObjectStore
from ray_jobs.placement import wait_for_placement

log = logging.getLogger(__name__)

def settings_from(config: dict[str, Any]) -> Settings:
    """Inside a worker: the driver's settings, rebuilt from the loop config (secrets from the
    cluster, not from the config Ray Train persists)."""
    return unshare(config["settings"])


def run_trainer(
    settings: Settings,
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    num_workers: int | None = None,
) -> ray.train.Result:
    """Fit ``loop`` on ``num_workers`` workers (DDP: gloo on CPU, NCCL on GPU)."""
    train = settings.train
    connect(settings)
    ObjectStore(settings.s3).ensure_bucket()  # pyarrow cannot create it
    workers = num_workers or train.num_workers
    _wait_for_workers(settings, workers)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "settings": share(settings, f"train-{name}")},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=train.use_gpu,
            resources_per_worker=None if train.use_gpu else {"CPU": train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=f"{settings.s3.bucket}/{train.storage_prefix}",
            storage_filesystem=storage_filesystem(settings),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # no env override for workers: they inherit their raylet's (and so the cluster's)
            # Ray auth settings
        ),
    )
    log.info("ray train %s: %d workers", name, workers)
    return trainer.fit()


def _wait_for_workers(settings: Settings, workers: int) -> None:
    """Ray Train waits silently forever for workers the cluster cannot place (e.g. while a
    Serve app holds the CPUs): reserve their bundles first, saying what is missing, and fail
    with :class:`ClusterBusy` after ``ray.placement_timeout_s``. The reservation is released
    before the trainer asks for the same resources."""
    from ray.util.placement_group import placement_group, remove_placement_group

    train = settings.train
    bundle = {"GPU": 1.0} if train.use_gpu else {"CPU": train.cpus_per_worker}
    group = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    try:
        wait_for_placement([group.ready()], train.cpus_per_worker if not train.use_gpu else 0,
                           settings.ray.placement_timeout_s, f"sets of {workers} Ray Train workers")
    finally:
        remove_placement_group(group)
