"""Kafka topics: names, keys and partitioning. The one place topic names are defined.

Full names are ``{settings.kafka.topic_prefix}.{Topic.name}`` (default prefix ``chatreid``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    value: str
    partitioning: str


CROPS = Topic(
    name="crops.v1",
    key="camera id (utf-8)",
    value="CropEvent (JSON)",
    partitioning="by key: one camera's crops stay ordered on one partition; embedder replicas "
    "scale up to the partition count",
)
INDEXED = Topic(
    name="indexed.v1",
    key="camera id (utf-8)",
    value="IndexedEvent (JSON, carries the embedding) or ErasedEvent (JSON: the crop was erased; "
    "stores drop it and ignore later IndexedEvents of it); decode with parse_index_log",
    partitioning="by key, like crops; prefilter stores follow every partition (no group)",
)
DEADLETTER = Topic(
    name="deadletter.v1",
    key="stage (ingestor|embedder)",
    value="DeadLetterEvent (JSON, with the reason and the original payload)",
    partitioning="by key",
)
CHECKPOINTS = Topic(
    name="checkpoints.v1",
    key="model kind (embedder|vlm)",
    value="CheckpointEvent (JSON)",
    partitioning="by key; order of checkpoints per model kind is the rollout order",
)

DEPLOYMENTS = Topic(
    name="deployments.v1",
    key="model kind (vlm)",
    value="DeploymentEvent (JSON): rollout started, completed, refused or rolled back",
    partitioning="by key; one model kind's rollout history stays ordered",
)

ALL_TOPICS: tuple[Topic, ...] = (CROPS, INDEXED, DEADLETTER, CHECKPOINTS, DEPLOYMENTS)
