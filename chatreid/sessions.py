"""Investigation sessions: the multi-turn conversation behind "where else was this person?".

A session is its turn log in object storage (``console.prefix/<id>/``: ``meta.json``, one
object per turn, uploaded query images), so any ingress replica serves it and a restart loses
nothing. What the next search asks is *derived* from the turns (:func:`derive`):

* text clues accumulate; a turn saying the person may have changed clothes drops the earlier
  ones (they describe the old outfit) and makes image searches cloth-changing;
* an image (upload or picked crop) and every confirmed crop are the query's images - the most
  recent one is shown to the VLM, the indexed ones all steer the prefilter (the paper's
  adaptive multi-modal retrieval: confirmed hits join the query);
* rejected crops are excluded from every later search, confirmed ones too (they are already
  on the timeline).

The derived query obeys the same limits as one ``QueryRequest`` (text length, attribute count):
a search turn that would push the session past them is refused (422
``session.query_too_long``) and the session is left as it was.

Sessions expire ``console.idle_hours`` after their last turn; the retention purge deletes
expired ones.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from chatreid.config import Settings
from chatreid.errors import BadQuery, SessionError
from chatreid.storage import ObjectNotFound, ObjectStore, sha256_hex
from schemas import QueryFilters, QueryKind, QueryRequest
from schemas.api import MAX_ATTRIBUTES, MAX_TEXT_CHARS
from schemas.console import (
    SearchTurn,
    SessionCreate,
    SessionSummary,
    SessionTurn,
    SessionView,
    Sighting,
)

UPLOAD = "upload:"
_CHANGED = re.compile(
    r"\b(?:(?:he|she|they|the person)\s+)?"
    r"(?:(?:may|might|could|probably|possibly|likely)\s+)?(?:have\s+|has\s+)?"
    r"(?:changed|switched|swapped)\s+(?:(?:his|her|their|the)\s+)?(?:clothes|clothing|outfits?)"
    r"|\b(?:in\s+)?(?:a\s+)?(?:different|other|new)\s+(?:clothes|clothing|outfit)"
    r"|\bcloth(?:es)?[\s-]+chang\w*",
    re.IGNORECASE,
)
_FILLER = re.compile(r"^[\s,.;:!-]*(?:and|but|so|now|he|she|they)?[\s,.;:!-]*$", re.IGNORECASE)


class UnknownSession(SessionError):
    status, code = 404, "session.unknown"


class SessionExpired(SessionError):
    status, code = 410, "session.expired"


class SessionFull(SessionError):
    status, code = 409, "session.full"


def changed_clothes(text: str | None) -> tuple[bool, str | None]:
    """Whether the text says the person changed clothes, and the rest of the text (the new
    outfit's description, if any)."""
    if not text or not _CHANGED.search(text):
        return False, text
    rest = _CHANGED.sub(" ", text)
    rest = re.sub(r"\s+", " ", rest).strip(" ,.;:-")
    return True, (None if _FILLER.match(rest) else rest)


@dataclass
class Investigation:
    """What the turns so far add up to."""

    filters: QueryFilters
    clues: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # explicit query images, oldest first
    refs: list[str] = field(default_factory=list)  # images and confirmed crops, oldest first
    confirmed: dict[str, Sighting] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    changed_clothes: bool = False

    @property
    def anchors(self) -> list[str]:
        """The query's images, most recent first: the latest confirmed crops and images."""
        return [r for r in reversed(self.refs) if r not in self.rejected]

    def apply(self, turn: SessionTurn) -> None:
        if turn.action == "search":
            self._search(turn)
        elif turn.action == "confirm" and turn.sighting is not None:
            self.confirmed.pop(turn.crop_id or "", None)  # re-confirming moves it to the end
            self.confirmed[turn.sighting.crop_id] = turn.sighting
            self.rejected.discard(turn.sighting.crop_id)
            self._ref(turn.sighting.crop_id)
        elif turn.action == "reject" and turn.crop_id:
            self.rejected.add(turn.crop_id)
            self.confirmed.pop(turn.crop_id, None)
            self.images = [i for i in self.images if i != turn.crop_id]
            self.refs = [r for r in self.refs if r != turn.crop_id]

    def _search(self, turn: SessionTurn) -> None:
        if turn.filters is not None:
            self.filters = turn.filters
        text = changed_clothes(turn.text)[1]  # the phrase itself is no clue
        if turn.changed_clothes:  # the earlier clues describe the old outfit
            self.changed_clothes = True
            self.clues, self.attributes = [], []
        if text and text.strip():
            self.clues.append(text.strip())
        self.attributes += [a for a in turn.attributes if a not in self.attributes]
        if turn.image:
            self.images = [i for i in self.images if i != turn.image] + [turn.image]
            self._ref(turn.image)

    def _ref(self, ref: str) -> None:
        self.refs = [r for r in self.refs if r != ref] + [ref]  # the latest mention counts

    def query(self, turn: SearchTurn, upload: bytes | None = None,
              upload_b64: str | None = None) -> QueryRequest:
        """The retrieval query for the search just applied (see the module docstring)."""
        anchors = self.anchors
        primary = anchors[0] if anchors else None
        indexed = [a for a in anchors[1:] if not a.startswith(UPLOAD)][:32]
        text = "; ".join(self.clues) or None
        self._within_limits(text)
        exclude = sorted(self.rejected | set(self.confirmed))
        common = {"filters": self.filters, "k": turn.k, "top": turn.top, "exclude": exclude}
        if primary is None:
            if not (text or self.attributes):
                raise BadQuery("nothing to search with yet: give text, attributes or an image, "
                               "or confirm a result", "session.empty_query")
            kind = QueryKind.TEXT_TO_IMAGE if text else QueryKind.ATTRIBUTE
            return _request(kind=kind, text=text, attributes=self.attributes, **common)
        image = ({"image_b64": upload_b64} if primary.startswith(UPLOAD)
                 else {"crop_id": primary})
        if primary.startswith(UPLOAD) and upload_b64 is None:
            raise BadQuery("the uploaded image is no longer stored", "session.upload_missing")
        if text or self.attributes:
            kind = QueryKind.MULTIMODAL
        else:
            kind = QueryKind.CLOTH_CHANGING if self.changed_clothes else QueryKind.STANDARD
        return _request(kind=kind, text=text, attributes=self.attributes, anchors=indexed,
                        **image, **common)

    def _within_limits(self, text: str | None) -> None:
        """The clues add up to one query, which has the single query's limits."""
        advice = ("start a new session, or say the person changed clothes (that drops the "
                  "earlier clues)")
        if text and len(text) > MAX_TEXT_CHARS:
            raise BadQuery(f"the session's text clues add up to {len(text)} characters, over "
                           f"the query limit of {MAX_TEXT_CHARS}: {advice}",
                           "session.query_too_long")
        if len(self.attributes) > MAX_ATTRIBUTES:
            raise BadQuery(f"the session's attributes add up to {len(self.attributes)}, over "
                           f"the query limit of {MAX_ATTRIBUTES}: {advice}",
                           "session.query_too_long")


def _request(**fields) -> QueryRequest:
    """A query a session derived; one the contract refuses is the client's 422, not a 500."""
    try:
        return QueryRequest(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadQuery(f"the session's next query is not valid: {problems}") from None


def derive(filters: QueryFilters, turns: list[SessionTurn]) -> Investigation:
    state = Investigation(filters=filters)
    for turn in turns:
        state.apply(turn)
    return state


@dataclass
class Session:
    session_id: str
    owner: str
    title: str | None
    filters: QueryFilters
    created_at: datetime
    turns: list[SessionTurn]

    @property
    def updated_at(self) -> datetime:
        return self.turns[-1].at if self.turns else self.created_at

    def expires_at(self, idle_hours: float) -> datetime:
        return self.updated_at + timedelta(hours=idle_hours)

    def state(self) -> Investigation:
        return derive(self.filters, self.turns)

    def view(self, idle_hours: float) -> SessionView:
        state = self.state()
        return SessionView(
            session_id=self.session_id, title=self.title, owner=self.owner,
            created_at=self.created_at, updated_at=self.updated_at,
            expires_at=self.expires_at(idle_hours), filters=state.filters, clues=state.clues,
            anchors=state.anchors, changed_clothes=state.changed_clothes,
            confirmed=sorted(state.confirmed.values(), key=lambda s: s.capture_time),
            rejected=sorted(state.rejected), turns=self.turns)

    def summary(self, idle_hours: float) -> SessionSummary:
        state = self.state()
        return SessionSummary(session_id=self.session_id, title=self.title,
                              created_at=self.created_at, updated_at=self.updated_at,
                              expires_at=self.expires_at(idle_hours), turns=len(self.turns),
                              confirmed=len(state.confirmed))


class SessionStore:
    def __init__(self, settings: Settings, objects: ObjectStore) -> None:
        self.cfg = settings.console
        self.objects = objects
        self.prefix = self.cfg.prefix.rstrip("/")

    def create(self, owner: str, request: SessionCreate) -> Session:
        session = Session(uuid.uuid4().hex[:16], owner, request.title, request.filters,
                          datetime.now(UTC), [])
        meta = {"session_id": session.session_id, "owner": owner, "title": request.title,
                "filters": request.filters.model_dump(mode="json"),
                "created_at": session.created_at.isoformat()}
        self.objects.put(self._meta_key(session.session_id), json.dumps(meta).encode(),
                         "application/json")
        self.objects.put(self._owner_key(owner, session.session_id), b"")  # owner's listing
        return session

    def load(self, session_id: str, owner: str | None = None) -> Session:
        """The session; 404 when unknown or another key's (``owner``), 410 when expired."""
        if not re.fullmatch(r"[0-9a-f]{16}", session_id):
            raise UnknownSession(f"no session {session_id!r}")
        try:
            meta = json.loads(self.objects.get(self._meta_key(session_id)))
        except ObjectNotFound:
            raise UnknownSession(f"no session {session_id!r}") from None
        if owner is not None and meta["owner"] != owner:
            raise UnknownSession(f"no session {session_id!r}")  # not revealing it exists
        keys = self.objects.list(f"{self.prefix}/{session_id}/turns/")
        turns = [SessionTurn.model_validate_json(self.objects.get(k)) for k in keys]
        session = Session(session_id, meta["owner"], meta["title"],
                          QueryFilters.model_validate(meta["filters"]),
                          datetime.fromisoformat(meta["created_at"]), turns)
        if session.expires_at(self.cfg.idle_hours) < datetime.now(UTC):
            raise SessionExpired(f"session {session_id} expired (idle over "
                                 f"{self.cfg.idle_hours:g} h)")
        return session

    def append(self, session: Session, turn: SessionTurn) -> Session:
        """Add a turn (one object, named so concurrent replicas never overwrite each other)."""
        if len(session.turns) >= self.cfg.max_turns:
            raise SessionFull(f"session {session.session_id} holds {self.cfg.max_turns} turns; "
                              "start a new one")
        key = f"{self.prefix}/{session.session_id}/turns/{time.time_ns():020d}-" \
              f"{uuid.uuid4().hex[:8]}.json"
        self.objects.put(key, turn.model_dump_json().encode(), "application/json")
        session.turns.append(turn)
        return session

    def owned(self, owner: str) -> list[Session]:
        """The owner's unexpired sessions, most recently active first (reads only theirs)."""
        sessions = []
        prefix = self._owner_key(owner, "")
        for sid in (k[len(prefix):] for k in self.objects.list(prefix)):
            try:
                sessions.append(self.load(sid, owner))
            except (UnknownSession, SessionExpired):
                continue
        return sorted(sessions, key=lambda s: s.updated_at, reverse=True)

    def put_upload(self, session_id: str, data: bytes) -> str:
        digest = sha256_hex(data)
        self.objects.put(f"{self.prefix}/{session_id}/uploads/{digest}", data)
        return UPLOAD + digest

    def get_upload(self, session_id: str, ref: str) -> bytes | None:
        try:
            return self.objects.get(f"{self.prefix}/{session_id}/uploads/{ref[len(UPLOAD):]}")
        except ObjectNotFound:
            return None

    def delete(self, session_id: str) -> int:
        try:
            owner = json.loads(self.objects.get(self._meta_key(session_id)))["owner"]
            self.objects.delete(self._owner_key(owner, session_id))
        except ObjectNotFound:
            pass
        keys = self.objects.list(f"{self.prefix}/{session_id}/")
        self.objects.delete_many(keys)
        return len(keys)

    def drop_uploads(self, session_id: str) -> int:
        """Delete the session's uploaded images (an erasure); returns how many."""
        keys = self.objects.list(f"{self.prefix}/{session_id}/uploads/")
        self.objects.delete_many(keys)
        return len(keys)

    def purge_expired(self) -> int:
        """Delete every expired session; returns how many."""
        purged = 0
        for sid in self._ids():
            try:
                self.load(sid)
            except SessionExpired:
                self.delete(sid)
                purged += 1
            except UnknownSession:
                continue
        return purged

    def _ids(self) -> list[str]:
        metas = [k for k in self.objects.list(self.prefix + "/") if k.endswith("/meta.json")]
        return [k[len(self.prefix) + 1:].split("/")[0] for k in metas]

    def _owner_key(self, owner: str, session_id: str) -> str:
        return f"{self.prefix}/_owners/{owner}/{session_id}"

    def _meta_key(self, session_id: str) -> str:
        return f"{self.prefix}/{session_id}/meta.json"
