"""The vision tower's output per image, computed once per encoder version and reused.

Training (a frozen encoder: ``chatreid.tuning.hpt``) and rerank (gallery crops that never
change: ``chatreid.rerank.judge``) both look features up here. Entries live under the
*encoder version*, a digest of the vision weights, their dtype and the image preprocessing;
a model whose encoder differs is refused (:meth:`VisionCache.check`), never served features
of another encoder.

Two tiers: a bounded in-process LRU (``capacity``), and optionally a shared tier
(:class:`ObjectStoreTier`: object storage under ``vision-cache/<version>/<key>``), so another
replica, or this one after a restart, reuses what any replica computed. A shared entry is
checked before use (its recorded version, dtype and shape against the image grid it records):
one that does not match is ignored, recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

if TYPE_CHECKING:
    from transformers import Qwen2VLForConditionalGeneration

    from chatreid.storage import ObjectStore

log = logging.getLogger(__name__)

VISION_CACHE_PREFIX = "vision-cache"


@dataclass(frozen=True)
class Encoded:
    """One image's merged vision tokens and its patch grid (t, h, w) - what the decoder needs."""

    features: torch.Tensor  # (tokens, hidden)
    grid: torch.Tensor  # (3,) int64


def encoder_version(model: Qwen2VLForConditionalGeneration, image_processor=None) -> str:
    """A digest of what the vision tower's output depends on: its weights and their dtype,
    and (when given) the image preprocessing (resize bounds, patching, normalisation)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    if image_processor is not None:
        digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


class FeatureTier(Protocol):
    """A shared tier of encoded images (object storage): raw entries by version and key."""

    def load_many(self, version: str, keys: Sequence[str]) -> list[bytes | None]: ...

    def save(self, version: str, key: str, data: bytes) -> None: ...


class ObjectStoreTier:
    """Entries as safetensors objects under ``vision-cache/<encoder version>/<key>`` (one
    prefix per encoder: an old encoder's entries go with one prefix deletion). Writes happen
    in the background (a query never waits on them); :meth:`flush` waits for them."""

    def __init__(self, objects: ObjectStore, prefix: str = VISION_CACHE_PREFIX) -> None:
        self.objects, self.prefix = objects, prefix.rstrip("/")
        self._pool = _io_pool()  # shared: a model swap makes a new tier, not new threads
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    def path(self, version: str, key: str) -> str:
        return f"{self.prefix}/{version}/{key}"

    def load(self, version: str, key: str) -> bytes | None:
        from chatreid.storage import ObjectNotFound

        try:
            return self.objects.get(self.path(version, key))
        except ObjectNotFound:
            return None

    def save(self, version: str, key: str, data: bytes) -> None:
        future = self._pool.submit(self.objects.put, self.path(version, key), data)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def load_many(self, version: str, keys: Sequence[str]) -> list[bytes | None]:
        """``load`` of each key, in parallel (a cold replica's first queries)."""
        return list(self._pool.map(lambda k: self.load(version, k), keys))

    def flush(self) -> None:
        """Wait until every write issued so far has landed (or failed: logged)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.exception()

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:  # a lost entry is recomputed later: never fatal
            log.warning("vision cache write failed: %s", future.exception())


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _io_pool() -> ThreadPoolExecutor:
    """The process's threads for shared-tier reads and writes (object-store round trips)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(4, thread_name_prefix="vision-cache")
        return _POOL


class VisionCache:
    """The vision tower's output per image key under one encoder version.

    ``capacity``: images kept in memory (least recently used dropped; None: unbounded, as a
    training run's fixed crop set is). ``tier``: the shared tier (None: memory only).
    Thread-safe: a rerank replica serves several queries at once.
    """

    def __init__(self, model: Qwen2VLForConditionalGeneration, *, image_processor=None,
                 capacity: int | None = None, tier: FeatureTier | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1 (None: unbounded)")
        self._image_processor = image_processor
        self.version = encoder_version(model, image_processor)
        self.capacity, self.tier = capacity, tier
        # the merger's output width, and how many patches (squared) it merges into one token
        config = model.config
        self._dim = int(config.text_config.hidden_size)  # pyright: ignore[reportAttributeAccessIssue, reportOptionalMemberAccess]
        self._merge = int(config.vision_config.spatial_merge_size)  # pyright: ignore[reportAttributeAccessIssue, reportOptionalMemberAccess]
        weight = next(model.model.visual.parameters())
        self._dtype, self._device = weight.dtype, weight.device
        self._local: OrderedDict[str, Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.shared_hits = self.refused = 0

    def check(self, model: Qwen2VLForConditionalGeneration) -> None:
        """Raise unless ``model``'s encoder is the one these features belong to."""
        theirs = encoder_version(model, self._image_processor)
        if theirs != self.version:
            raise ValueError(f"cached vision features belong to encoder {self.version[:12]}, "
                             f"the model's encoder is {theirs[:12]}: refusing to mix them")

    # -- look-up and store ---------------------------------------------------------------
    def lookup(self, key: str) -> Encoded | None:
        """The entry for ``key``: from memory, else from the shared tier (checked, then kept in
        memory); None when neither holds a valid one."""
        return self.lookup_many([key])[0]

    def lookup_many(self, keys: Sequence[str]) -> list[Encoded | None]:
        """``lookup`` of each key; the shared tier is read for all memory misses at once."""
        found: list[Encoded | None] = []
        with self._lock:
            for key in keys:
                entry = self._local.get(key)
                if entry is not None:
                    self._local.move_to_end(key)
                    self.hits += 1
                found.append(entry)
        absent = [i for i, e in enumerate(found) if e is None]
        shared = self._from_tier([keys[i] for i in absent])
        with self._lock:
            for i, entry in zip(absent, shared, strict=True):
                if entry is None:
                    self.misses += 1
                    continue
                self.shared_hits += 1
                self._keep(keys[i], entry)
                found[i] = entry
        return found

    def store(self, key: str, entry: Encoded, *, share: bool = True) -> None:
        """Keep ``entry`` in memory and (``share``, with a tier) write it to the shared tier."""
        self._validate(entry)
        with self._lock:
            self._keep(key, entry)
        if share and self.tier is not None:
            self.tier.save(self.version, key, self._encode(entry))

    @torch.no_grad()
    def features(self, model, keys: list[str], pixels: torch.Tensor, grid: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
        """Each image's merged tokens: from the cache, else one encoder forward for the missing
        images (rows of ``pixels`` are split by ``grid``) - the training loop's call."""
        rows = [int(t * h * w) for t, h, w in grid.tolist()]
        chunks = torch.split(pixels, rows)
        found = [self.lookup(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            out = model.model.get_image_features(
                torch.cat([chunks[i] for i in missing]), grid[missing]).pooler_output
            for i, f in zip(missing, out, strict=True):
                entry = found[i] = Encoded(f.detach(), grid[i].detach())
                self.store(keys[i], entry)
        return tuple(e.features for e in found if e is not None)

    # -- internals ---------------------------------------------------------------------------
    def _keep(self, key: str, entry: Encoded) -> None:
        self._local[key] = entry
        self._local.move_to_end(key)
        if self.capacity is not None:
            while len(self._local) > self.capacity:
                self._local.popitem(last=False)

    def _validate(self, entry: Encoded) -> None:
        """Raise ValueError unless ``entry`` is what this encoder emits for its grid."""
        t, h, w = (int(v) for v in entry.grid.tolist())
        tokens = t * h * w // self._merge**2
        if tuple(entry.features.shape) != (tokens, self._dim):
            raise ValueError(f"vision features of shape {tuple(entry.features.shape)} for grid "
                             f"{(t, h, w)}: this encoder emits ({tokens}, {self._dim})")
        if entry.features.dtype != self._dtype:
            raise ValueError(f"vision features in {entry.features.dtype}, this encoder emits "
                             f"{self._dtype}")

    def _encode(self, entry: Encoded) -> bytes:
        tensors = {"features": entry.features.detach().cpu().contiguous(),
                   "grid": entry.grid.detach().cpu().to(torch.int64)}
        return save_tensors(tensors, metadata={"encoder_version": self.version})

    def _from_tier(self, keys: Sequence[str]) -> list[Encoded | None]:
        if self.tier is None or not keys:
            return [None] * len(keys)
        try:
            blobs = self.tier.load_many(self.version, keys)
        except Exception as exc:  # the shared tier down: compute, never fail the query
            log.warning("vision cache tier unavailable (%s): recomputing", exc)
            return [None] * len(keys)
        return [None if data is None else self._checked(key, data)
                for key, data in zip(keys, blobs, strict=True)]

    def _checked(self, key: str, data: bytes) -> Encoded | None:
        try:
            entry = self._decode(data)
            self._validate(entry)
        except Exception as exc:  # a corrupt, foreign or stale entry: recompute, never use
            self.refused += 1
            log.warning("vision cache entry %s/%s refused (%s): recomputing", self.version[:12],
                        key, exc)
            return None
        return entry

    def _decode(self, data: bytes) -> Encoded:
        meta = _metadata(data)
        if meta.get("encoder_version") != self.version:
            raise ValueError(f"entry of encoder {str(meta.get('encoder_version'))[:12]}")
        tensors = load_tensors(data)
        return Encoded(tensors["features"].to(self._device), tensors["grid"].to(self._device))


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors blob's ``__metadata__`` (its header: an 8-byte length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})

