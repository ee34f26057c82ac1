"""The audit trail: who searched for what, saw which crops, erased or changed what.

Append-only by construction: each entry is its own object, named by time and a random id, and
written once (``audit.prefix/YYYY/MM/DD/HHMMSSffffff-<id>.json``); the API offers no way to
change or delete one, only to export. Entries carry ids, kinds and filters - never images,
tokens or secrets. An action whose entry cannot be written fails (accountability first).

For tamper resistance beyond the API (an operator with storage credentials), put the audit
prefix under a bucket policy or object lock that denies overwrite and delete; see deploy/.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from chatreid.config import Settings
from chatreid.storage import ObjectStore
from schemas.api import as_utc
from schemas.console import AuditEntry

_LIST_DAYS = 62  # a longer window lists the whole prefix once instead of one list per day


class AuditLog:
    def __init__(self, settings: Settings, objects: ObjectStore) -> None:
        self.objects = objects
        self.prefix = settings.audit.prefix.rstrip("/")
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="audit-read")

    def record(self, actor: str, actor_name: str, action: str, status: int,
               **fields) -> AuditEntry:
        at = datetime.now(UTC)
        entry = AuditEntry(entry_id=uuid.uuid4().hex, at=at, actor=actor, actor_name=actor_name,
                           action=action, status=status, **fields)
        key = f"{self.prefix}/{_day(at)}/{at:%H%M%S%f}-{entry.entry_id}.json"
        self.objects.put(key, entry.model_dump_json().encode(), "application/json")
        return entry

    def export(self, since: datetime | None = None, until: datetime | None = None,
               actor: str | None = None, action: str | None = None) -> Iterator[AuditEntry]:
        """Entries in time order inside [since, until], optionally one actor's or action's.
        Times without a zone are UTC; an empty window (since after until) has no entries."""
        now = datetime.now(UTC)
        # nothing is logged in the future (a day covers clock skew between replicas): a far
        # ``until`` (year 9999) costs nothing
        until = min(as_utc(until) or now, now + timedelta(days=1))
        since = as_utc(since) or _days_before(until, 30)
        if since > until:
            return
        if until - since > timedelta(days=_LIST_DAYS):  # one listing, filtered by day
            first, last = f"{self.prefix}/{_day(since)}/", f"{self.prefix}/{_day(until)}/~"
            keys = [k for k in self.objects.list(self.prefix + "/") if first <= k <= last]
        else:
            keys = [k for day in _days(since, until)
                    for k in self.objects.list(f"{self.prefix}/{_day(day)}/")]
        for raw in self._pool.map(self.objects.get, keys):  # keys sort by time within a day
            entry = AuditEntry.model_validate(json.loads(raw))
            if not since <= entry.at <= until:
                continue
            if (actor and entry.actor != actor) or (action and entry.action != action):
                continue
            yield entry


def _day(at: datetime) -> str:
    """``YYYY/MM/DD`` (zero-padded: strftime's %Y is not, before year 1000, and keys must
    sort by time)."""
    return f"{at.year:04d}/{at.month:02d}/{at.day:02d}"


def _days_before(at: datetime, days: int) -> datetime:
    try:
        return at - timedelta(days=days)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def _days(since: datetime, until: datetime) -> Iterator[datetime]:
    day = since.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    while day <= until:
        yield day
        day += timedelta(days=1)
