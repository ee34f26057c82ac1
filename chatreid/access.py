"""Access control: API keys with roles, checked on every request, and a rate limit per key.

Roles: ``investigator`` (search, sessions, crops), ``operator`` (deploy, scale, trigger
training), ``admin`` (keys, audit export, retention, erasure). A key holds one or more roles;
no role implies another, so an admin key cannot search unless it is also given that role.

Keys are bearer tokens ``crk_<key id>_<secret>``. The store keeps only the token's SHA-256
(the secret is 256 random bits, so a plain hash cannot be reversed) under
``access.key_prefix`` in object storage, where every ingress replica reads it (cached for
``access.cache_s``: a revoked key stops working within that time). The bootstrap key
(``serve.api_key``, from a secret) holds every role; it issues the scoped keys.

Access control is on unless ``access.insecure`` turns it off (local experiments only; each
replica logs a warning): then every caller is ``anonymous`` with every role, the audit log
still records each action, and no key can be issued - a key minted by anyone is no credential.
Records are marked with whether access control was on when they were issued; a key issued
while it was off (or by ``anonymous``, for records older than the mark) is refused later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from chatreid.config import Settings, reveal
from chatreid.errors import AccessError
from chatreid.storage import ObjectNotFound, ObjectStore
from schemas.console import ROLES, ApiKeyCreate, ApiKeyInfo, ApiKeyIssued, Principal, Role

_TOKEN_PREFIX = "crk_"
ANONYMOUS = "anonymous"
_SECURE_MARK = "issued_with_access_control"  # in the stored record, beside the hash
log = logging.getLogger(__name__)


class Unauthenticated(AccessError):
    status, code = 401, "auth.required"


class Forbidden(AccessError):
    status, code = 403, "auth.forbidden"


class RateLimited(AccessError):
    status, code = 429, "rate.limited"

    def __init__(self, detail: str, code: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(detail, code)
        self.retry_after_s: float = retry_after_s


class UnknownKey(AccessError):
    status, code = 404, "key.unknown"


class AccessControlOff(AccessError):
    """Key issuing while access control is off: such a key could be minted by anyone."""

    status, code = 409, "access.insecure"


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    roles: frozenset[Role]
    rate_per_minute: int

    def require(self, role: Role) -> None:
        if role not in self.roles:
            raise Forbidden(f"this needs the {role!r} role; key {self.key_id!r} has "
                            f"{sorted(self.roles) or 'none'}")

    def principal(self) -> Principal:
        return Principal(key_id=self.key_id, name=self.name, roles=sorted(self.roles))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """Issued keys in object storage (hashes only) plus the bootstrap key from settings."""

    def __init__(self, settings: Settings, objects: ObjectStore) -> None:
        self.settings, self.objects = settings, objects
        self.prefix = settings.access.key_prefix.rstrip("/")
        self._cache: dict[str, tuple[float, dict | None]] = {}
        self._lock = threading.Lock()
        if not self.enabled:  # once per store, i.e. per ingress replica
            log.warning("ACCESS CONTROL IS OFF (access.insecure=true): every caller of this API "
                        "holds every role, admin included. Local experiments only - unset "
                        "CHATREID_ACCESS__INSECURE and use the bootstrap key (serve.api_key).")

    @property
    def enabled(self) -> bool:
        """Access control is on unless explicitly turned off (``access.insecure``)."""
        return not self.settings.access.insecure

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization`` header value; 401 when it is missing or
        invalid. Comparisons are constant-time; the token itself is never logged or kept."""
        rate = self.settings.access.rate_per_minute
        if not self.enabled:
            return Caller(ANONYMOUS, ANONYMOUS, frozenset(ROLES), rate)
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send 'Authorization: Bearer <API key>'")
        bootstrap = reveal(self.settings.serve.api_key)
        if bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
            return Caller("bootstrap", "bootstrap key", frozenset(ROLES), rate)
        record = self._record(_key_id(token))
        if record is None or not hmac.compare_digest(token_hash(token), record["hash"]):
            raise Unauthenticated("the API key is not valid", "auth.invalid")
        if record.get("revoked_at"):
            raise Unauthenticated("the API key was revoked", "auth.revoked")
        if not trusted(record):
            raise Unauthenticated("the API key was issued while access control was off, so "
                                  "anyone could have minted it; an admin must issue a new one",
                                  "auth.untrusted")
        return Caller(record["key_id"], record["name"], frozenset(record["roles"]),
                      record.get("rate_per_minute") or rate)

    def issue(self, request: ApiKeyCreate, by: str) -> ApiKeyIssued:
        """A new key; refused (409 ``access.insecure``) while access control is off."""
        if not self.enabled or by == ANONYMOUS:
            raise AccessControlOff("keys cannot be issued while access control is off "
                                   "(access.insecure): anyone could mint them. Turn it on and "
                                   "issue keys with the bootstrap key")
        key_id = "k" + secrets.token_hex(6)
        token = f"{_TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        info = ApiKeyInfo(key_id=key_id, name=request.name, roles=sorted(set(request.roles)),
                          rate_per_minute=request.rate_per_minute,
                          created_at=datetime.now(UTC), created_by=by)
        self._write(info, token_hash(token), secure=True)
        return ApiKeyIssued(**info.model_dump(), secret=token)

    def revoke(self, key_id: str, by: str) -> ApiKeyInfo:
        record = self._record(key_id, fresh=True)
        if record is None:
            raise UnknownKey(f"no key {key_id!r}")
        info = _info(record)
        if info.revoked_at is None:
            info.revoked_at = datetime.now(UTC)
            self._write(info, record["hash"], secure=record.get(_SECURE_MARK))
        return info

    def list(self) -> list[ApiKeyInfo]:
        keys = [k for k in self.objects.list(self.prefix + "/") if k.endswith(".json")]
        records = [json.loads(self.objects.get(k)) for k in keys]
        return sorted((_info(r) for r in records), key=lambda i: i.created_at)

    def _write(self, info: ApiKeyInfo, digest: str, secure: bool | None) -> None:
        record = {**info.model_dump(mode="json"), "hash": digest}
        if secure is not None:  # a record older than the mark stays without one
            record[_SECURE_MARK] = secure
        self.objects.put(f"{self.prefix}/{info.key_id}.json", json.dumps(record).encode(),
                         "application/json")
        with self._lock:
            self._cache[info.key_id] = (time.monotonic(), record)

    def _record(self, key_id: str | None, fresh: bool = False) -> dict | None:
        if key_id is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key_id)
        if cached and not fresh and now - cached[0] < self.settings.access.cache_s:
            return cached[1]
        try:
            record = json.loads(self.objects.get(f"{self.prefix}/{key_id}.json"))
        except ObjectNotFound:
            record = None
        with self._lock:
            self._cache[key_id] = (now, record)
            if len(self._cache) > 10_000:  # unknown ids from guessing: keep memory bounded
                self._cache.pop(next(iter(self._cache)))
        return record


def _key_id(token: str) -> str | None:
    if not token.startswith(_TOKEN_PREFIX):
        return None
    key_id, sep, _ = token[len(_TOKEN_PREFIX):].partition("_")
    return key_id if sep and key_id.isalnum() and len(key_id) <= 32 else None


def trusted(record: dict) -> bool:
    """Whether a stored key was issued with access control on: records carry the mark; older
    ones without it are trusted unless ``anonymous`` created them (access control was off)."""
    mark = record.get(_SECURE_MARK)
    return bool(mark) if mark is not None else record.get("created_by") != ANONYMOUS


def _info(record: dict) -> ApiKeyInfo:
    return ApiKeyInfo.model_validate({k: v for k, v in record.items()
                                      if k not in ("hash", _SECURE_MARK)})


class RateLimiter:
    """A token bucket per key (per replica): ``rate_per_minute`` requests, refilled evenly.

    Kept by hand on purpose: the rate-limit libraries (e.g. ``limits``) offer fixed, moving
    and sliding-counter windows, with which a key that spent its minute waits until its window
    moves (up to a minute); here one request comes back every 60/rate seconds, and that wait
    is what ``Retry-After`` says."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, updated)
        self._lock = threading.Lock()

    def check(self, caller: Caller) -> None:
        rate = caller.rate_per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, updated = self._buckets.get(caller.key_id, (caller.rate_per_minute, now))
            tokens = min(caller.rate_per_minute, tokens + (now - updated) * rate)
            if tokens < 1.0:
                self._buckets[caller.key_id] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(f"over {caller.rate_per_minute} requests per minute for key "
                                  f"{caller.key_id!r}; retry in {wait:.1f}s", retry_after_s=wait)
            self._buckets[caller.key_id] = (tokens - 1.0, now)
