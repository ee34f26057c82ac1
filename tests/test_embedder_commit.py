"""The embedding service commits offsets only after the durable write, and a consumer-group
rebalance during that commit neither loses the batch nor crashes the service."""

from __future__ import annotations

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, RebalanceInProgressError
from kafka.structs import TopicPartition

from services.embedder.service import EmbedderService


class _Consumer:
    """Stands in for the group member only: raises the given errors, then accepts."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors, self.commits, self.polls = list(errors), [], 0

    def commit(self, offsets):
        if self.errors:
            raise self.errors.pop(0)
        self.commits.append(offsets)

    def poll(self, timeout_ms: int = 0):
        self.polls += 1
        return {}


def _service(consumer: _Consumer) -> EmbedderService:
    service = EmbedderService.__new__(EmbedderService)  # only _commit's state
    service.consumer = consumer
    return service


def _records() -> list[ConsumerRecord]:
    def rec(partition: int, offset: int) -> ConsumerRecord:
        return ConsumerRecord("crops", partition, None, offset, 0, 0, None, b"", [], None, 0,
                              0, 0)
    return [rec(0, 5), rec(0, 7), rec(1, 2)]


def test_commit_retries_through_a_rebalance_and_commits_the_next_offsets():
    consumer = _Consumer([RebalanceInProgressError(), RebalanceInProgressError()])
    _service(consumer)._commit(_records())
    assert consumer.polls == 2  # each retry lets the group rejoin first
    (offsets,) = consumer.commits
    assert {tp: o.offset for tp, o in offsets.items()} == {
        TopicPartition("crops", 0): 8, TopicPartition("crops", 1): 3}


@pytest.mark.parametrize("errors", [[CommitFailedError()], [RebalanceInProgressError()] * 5])
def test_a_commit_that_cannot_land_is_left_to_the_replay(errors):
    consumer = _Consumer(errors)
    _service(consumer)._commit(_records())  # no exception: the batch is replayed, not lost
    assert consumer.commits == []
