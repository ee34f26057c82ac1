"""Readers of a whole topic from its start (checkpoint watchers, rollout verdicts) must not take a
late metadata answer for a missing topic: a training run once lost its gate figures to "No
partitions are currently assigned" while the topic existed."""

from __future__ import annotations

import time

from chatreid.bus import wait_listed


class _SlowMetadata:
    """A consumer whose broker lists the topic only from a given metadata answer on."""

    def __init__(self, answers: list[set[int] | None]) -> None:
        self.answers, self.asked = answers, 0

    def partitions_for_topic(self, _topic: str) -> set[int] | None:
        self.asked += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_topic_listed_late_is_still_found() -> None:
    consumer = _SlowMetadata([None, set(), {1, 0}])
    assert wait_listed(consumer, "t.checkpoints") == {0, 1}  # pyright: ignore[reportArgumentType]
    assert consumer.asked == 3


def test_a_listed_topic_costs_one_metadata_answer() -> None:
    consumer = _SlowMetadata([{0}])
    start = time.monotonic()
    assert wait_listed(consumer, "t.checkpoints") == {0}  # pyright: ignore[reportArgumentType]
    assert consumer.asked == 1 and time.monotonic() - start < 0.1


def test_a_topic_never_listed_gives_up_after_the_wait() -> None:
    consumer = _SlowMetadata([set()])
    start = time.monotonic()
    assert wait_listed(consumer, "t.gone", wait_s=0.3) == set()  # pyright: ignore[reportArgumentType]
    assert 0.3 <= time.monotonic() - start < 1.5
