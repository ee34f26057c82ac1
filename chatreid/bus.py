"""Kafka through kafka-python only: clients, topic creation and event publishing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import TopicPartition

from chatreid.config import KafkaSettings
from schemas import ALL_TOPICS, DeadLetterEvent
from schemas.events import _Event

log = logging.getLogger(__name__)


def make_producer(settings: KafkaSettings, **overrides) -> KafkaProducer:
    """acks=all with idempotence: a retried send never duplicates on the broker."""
    kwargs = dict(
        **settings.client_options(),
        client_id=settings.client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        retries=10,
        max_request_size=2 * 1024 * 1024,
    )
    kwargs.update(overrides)
    return KafkaProducer(**kwargs)


def make_consumer(settings: KafkaSettings, group_id: str | None, **overrides) -> KafkaConsumer:
    """Auto-commit off: callers commit after their effect is durable."""
    kwargs = dict(
        **settings.client_options(),
        client_id=settings.client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    kwargs.update(overrides)
    return KafkaConsumer(**kwargs)


def assign_all(consumer: KafkaConsumer, topic: str,
               keep: Callable[[int], bool] | None = None,
               parts: set[int] | None = None) -> list[TopicPartition]:
    """Assign every partition of ``topic`` (those ``keep`` accepts, when given: a prefilter
    shard's) to ``consumer`` (no consumer group: nothing is shared out, this reader sees every
    record of them); returns them in partition order. ``parts``: the partitions already listed
    (:func:`wait_listed`), else the broker's metadata is asked now."""
    if parts is None:
        parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts) if keep is None or keep(p)]
    consumer.assign(tps)
    return tps


def wait_listed(consumer: KafkaConsumer, topic: str, wait_s: float = 5.0) -> set[int]:
    """``topic``'s partitions once the broker's metadata lists them, asking again for up to
    ``wait_s``: a broker under load can answer a metadata request without a topic that exists
    (seen with Tansu during training, where a whole-topic reader then failed with "No
    partitions are currently assigned"). Empty when the topic is still not listed. Only for
    readers that start from the beginning: a tail reader that waited would skip what was
    published meanwhile."""
    deadline = time.monotonic() + wait_s
    while not (parts := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return parts or set()


def read_from_start(settings: KafkaSettings, topic: str, **overrides) -> KafkaConsumer:
    """A consumer of the whole of ``topic``, from each partition's first record, outside any
    consumer group: every replica or watcher reading this way sees every record (checkpoint
    announcements, rollout verdicts), and commits nothing."""
    consumer = make_consumer(settings, None, **overrides)
    try:
        assign_all(consumer, topic, parts=wait_listed(consumer, topic))
        consumer.seek_to_beginning()
    except Exception:
        consumer.close()
        raise
    return consumer


def end_offsets(consumer: KafkaConsumer,
                tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """Each partition's log end: the larger of what ListOffsets reports and the high watermark
    of the consumer's latest fetch response there. Some Kafka-protocol brokers (Tansu) report
    the last batch's base offset + 1 to ListOffsets, one batch short, while their fetch
    responses carry the real end; either is a lower bound of the end now."""
    tps = list(tps)
    reported = consumer.end_offsets(tps) if tps else {}
    return {tp: max(end, consumer.highwater(tp) or 0) for tp, end in reported.items()}


def position(consumer: KafkaConsumer, tp: TopicPartition) -> int:
    """The offset ``consumer`` reads next on ``tp``. kafka-python returns None only when a
    timeout runs out first, and without one it waits until it knows."""
    offset = consumer.position(tp)
    if offset is None:
        raise KafkaTimeoutError(f"no position for {tp}")
    return offset


def topic_id(consumer: KafkaConsumer, topic: str):
    """The topic's id (a UUID, newer brokers and Tansu) as the consumer's metadata last saw it,
    or None. A changed id means the topic was recreated - a memory-only broker restarted -
    and offsets into the old log mean nothing in the new one. (kafka-python keeps no public
    accessor for its cluster metadata.)"""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    lookup = getattr(cluster, "topic_id", None)
    return lookup(topic) if lookup is not None else None


def ensure_topics(settings: KafkaSettings, names: Iterable[str] | None = None) -> list[str]:
    """Create the project's topics if missing; returns the ones it created."""
    wanted = [settings.topic(t.name) for t in ALL_TOPICS] if names is None else list(names)
    admin = KafkaAdminClient(**settings.client_options(), client_id=f"{settings.client_id}-admin")
    try:
        existing = set(admin.list_topics())
        created = []
        for name in wanted:
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, settings.partitions,
                                              settings.replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def broker_reachable(settings: KafkaSettings) -> bool:
    try:
        admin = KafkaAdminClient(**settings.client_options(), request_timeout_ms=3000)
    except Exception:  # kafka-python raises several kinds while no broker answers
        return False
    admin.close()
    return True


def publish(producer: KafkaProducer, topic: str, key: str, event: _Event):
    """Send one event; returns the future (call ``.get()`` or ``producer.flush()`` to be sure)."""
    return producer.send(topic, key=key.encode(), value=event.to_bytes())


def dead_letter(producer: KafkaProducer, settings: KafkaSettings, event: DeadLetterEvent) -> None:
    """Dead letters are sent synchronously: losing the reason would lose the crop silently."""
    from schemas import DEADLETTER

    log.warning("dead letter (%s): %s %s", event.stage, event.error, event.reason)
    publish(producer, settings.topic(DEADLETTER.name), event.stage, event).get(timeout=30)
