"""Readers of a whole topic (watchers, followers) must not take a late metadata answer for an
empty topic: a training run once lost its gate figures to "No partitions are currently
assigned" while the topic existed."""

from __future__ import annotations

from kafka.structs import TopicPartition

from chatreid.bus import assign_all


class _SlowMetadata:
    """A consumer whose broker lists the topic only from its third metadata answer on."""

    def __init__(self, answers: list[set[int] | None]) -> None:
        self.answers, self.assigned = answers, None

    def partitions_for_topic(self, _topic: str) -> set[int] | None:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps


def test_a_topic_listed_late_is_still_read_whole() -> None:
    consumer = _SlowMetadata([None, set(), {1, 0}])
    tps = assign_all(consumer, "t.checkpoints")  # pyright: ignore[reportArgumentType]
    assert tps == consumer.assigned == [TopicPartition("t.checkpoints", 0),
                                        TopicPartition("t.checkpoints", 1)]


def test_a_topic_never_listed_gets_no_partitions_after_the_wait() -> None:
    consumer = _SlowMetadata([set()])
    assert assign_all(consumer, "t.gone", metadata_wait_s=0.3) == []  # pyright: ignore[reportArgumentType]
