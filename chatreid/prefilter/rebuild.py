"""Embedder rollouts as the index sees them: a report in object storage marks a rebuilt index.

When the embedding service moves to a new embedder, it writes every new crop under both
versions and re-embeds every crop the old index holds under the new one; the replica that did
the re-embedding then writes ``<snapshot_prefix>/rollouts/<version>.json``. A reader switches
to the new version once that report exists *and* its own copy of the new index holds every
crop of the old one (less the crops the report lists as impossible to re-embed, e.g. deleted
objects), so no answer ever comes from a half-built index.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from chatreid.config import Settings
from chatreid.storage import ObjectNotFound, ObjectStore
from schemas import SourceOffset

__all__ = ["RolloutReport", "read_report", "report_key", "write_report"]


class RolloutReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(description="the embedder version the index was rebuilt for")
    from_version: str | None = Field(description="the version whose crops were re-embedded")
    checkpoint: SourceOffset | None = Field(None, description="the checkpoint event it follows")
    reindexed: int = Field(ge=0, description="crops re-embedded by this rollout")
    unembeddable: tuple[str, ...] = Field((), description="crop ids that could not be fetched "
                                          "or decoded (dead-lettered)")
    passes: int = Field(ge=1, description="re-embedding passes until the new index covered "
                        "the old one")
    finished_at: float = Field(default_factory=time.time)


def report_key(settings: Settings, version: str) -> str:
    return f"{settings.index.snapshot_prefix}/rollouts/{version}.json"


def read_report(settings: Settings, objects: ObjectStore, version: str) -> RolloutReport | None:
    try:
        return RolloutReport.model_validate_json(objects.get(report_key(settings, version)))
    except ObjectNotFound:
        return None


def write_report(settings: Settings, objects: ObjectStore, report: RolloutReport) -> str:
    key = report_key(settings, report.version)
    objects.put(key, report.model_dump_json(indent=2).encode(), "application/json")
    return key
