"""Worlds in object storage: content ids, upload, and world-relative image paths resolved anywhere.

Instruction datasets name their images by path relative to the world root (``market1501/
bounding_box_train/0001_c1s1_000001_00.jpg``), so a dataset is portable. ``upload_world`` puts a
world's files under ``worlds/<world_id>/`` and its index ``world.json`` last, so a reader that
finds the index finds every file. ``ImageResolver`` reads the local copy of a world when there is
one and otherwise downloads each image once into a cache: training workers on other machines.

Real images (``chatreid.data.instructions.real``) are never uploaded: a dataset names them
``real:<dataset>/<path in the dataset folder>`` (``real:cuhk03_pair1/train/0007_05.jpg``) and
every machine reads them from its own copy of the real folder (``ImageResolver``'s
``real_root``, by default the ``train.real_root`` setting).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path, PurePosixPath

from chatreid.config import Settings
from chatreid.data.datasets import DATASETS, DatasetLayoutError
from chatreid.storage import ObjectNotFound, ObjectStore, sha256_hex

ANNOTATIONS: tuple[str, ...] = ("attributes/attributes.json", "attributes/identities.json")
WORLD_INDEX = "world.json"
# Absolute, so Ray workers (whatever their working directory) share the driver's cache.
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "chatreid-cache" / "worlds"
# Prefix of a real image's path in a dataset; ':' never starts a world-relative path.
REAL_SCHEME = "real:"


class WorldError(ValueError):
    """A world that is not annotated, not uploaded, or a path that escapes it."""


def world_id(world_root: Path) -> str:
    """Short content hash of the annotations: the same world has the same id wherever it lies."""
    digest = hashlib.sha256()
    for rel in ANNOTATIONS:
        path = Path(world_root) / rel
        if not path.is_file():
            raise WorldError(f"{world_root} is not an annotated world: {rel} is missing")
        data = path.read_bytes()
        digest.update(f"{rel}:{len(data)}:".encode())  # length-prefixed: no ambiguous joins
        digest.update(data)
    return digest.hexdigest()[:16]


def world_prefix(wid: str) -> str:
    return f"worlds/{wid}"


def check_relpath(relpath: str) -> str:
    """A world-relative POSIX path that cannot escape the root (no absolute path, no ``..``)."""
    parts = PurePosixPath(relpath).parts
    if not parts or PurePosixPath(relpath).is_absolute() or ".." in parts or "\\" in relpath:
        raise WorldError(f"not a world-relative image path: {relpath!r}")
    return relpath


def resolve_image(world_root: Path, relpath: str) -> Path:
    """The local file of a world-relative image path."""
    return Path(world_root) / check_relpath(relpath)


def relativize(world_root: Path, path: str, real: tuple[str, Path] | None = None) -> str:
    """Absolute image path written by a builder -> world-relative POSIX path, or, for an image
    of the real set ``real = (dataset, dataset folder)``, its ``real:`` path."""
    try:
        return Path(path).relative_to(world_root).as_posix()
    except ValueError:
        if real is not None and Path(path).is_relative_to(real[1]):
            return f"{REAL_SCHEME}{real[0]}/{Path(path).relative_to(real[1]).as_posix()}"
        raise WorldError(f"image {path} lies outside the world {world_root}") from None


def is_real(relpath: str) -> bool:
    return relpath.startswith(REAL_SCHEME)


def split_real(relpath: str) -> tuple[str, str]:
    """``real:<dataset>/<path>`` -> (dataset, path inside the dataset folder), checked."""
    dataset, _, rest = relpath.removeprefix(REAL_SCHEME).partition("/")
    if dataset not in DATASETS or not rest:
        raise WorldError(f"not a real image path: {relpath!r} (real:<dataset>/<path>)")
    return dataset, check_relpath(rest)


@lru_cache(maxsize=8)
def real_dataset_dir(dataset: str, root: Path) -> Path:
    """The folder of ``dataset`` under ``root`` (itself or a parent, as the reader accepts)."""
    return DATASETS[dataset](root).dataset_dir


def resolve_real(relpath: str, real_root: Path | None) -> Path:
    """The local file of a ``real:`` path under ``real_root``; a clear error when it is not
    there (real images are never downloaded)."""
    dataset, rest = split_real(relpath)
    if real_root is None:
        raise WorldError(f"{relpath} is a real image but no real root is configured "
                         "(train.real_root, CHATREID_TRAIN__REAL_ROOT)")
    try:
        path = real_dataset_dir(dataset, Path(real_root).absolute()) / rest
    except DatasetLayoutError as exc:
        raise WorldError(f"{relpath}: {exc}") from None
    if not path.is_file():
        raise WorldError(f"{relpath}: no such real image {path}")
    return path


# ----------------------------------------------------------------------------- upload


def _world_files(world_root: Path) -> list[str]:
    return sorted(
        p.relative_to(world_root).as_posix()
        for p in world_root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


def upload_world(settings: Settings, world_root: Path, *, workers: int = 8) -> str:
    """Upload every file of the world under ``worlds/<world_id>/``; returns the world id.

    Idempotent: a world whose index is already stored is not uploaded again.
    """
    root = Path(world_root)
    wid = world_id(root)
    store = ObjectStore(settings.s3)
    store.ensure_bucket()
    index_key = f"{world_prefix(wid)}/{WORLD_INDEX}"
    if store.exists(index_key):
        return wid

    def put(rel: str) -> tuple[str, dict[str, object]]:
        data = (root / rel).read_bytes()
        store.put(f"{world_prefix(wid)}/{rel}", data)
        return rel, {"sha256": sha256_hex(data), "size": len(data)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        files = dict(pool.map(put, _world_files(root)))
    index = {"world_id": wid, "files": files}
    store.put(index_key, json.dumps(index, sort_keys=True).encode(), "application/json")
    return wid


def _write_atomic(path: Path, data: bytes) -> None:
    """Concurrent readers of a cache never see half a file: write aside, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fetch(store: ObjectStore, wid: str, relpath: str, dest: Path) -> Path:
    try:
        data = store.get(f"{world_prefix(wid)}/{relpath}")
    except ObjectNotFound:
        raise WorldError(
            f"{relpath} of world {wid} is not in bucket {store.bucket!r} (run upload_world first)"
        ) from None
    _write_atomic(dest, data)
    return dest


def annotated_root(
    settings: Settings, world_root: Path, wid: str, cache_dir: Path = DEFAULT_CACHE
) -> Path:
    """A directory holding the world's annotations: the local world, else a cached download.

    Builders read only the annotations (image paths are just strings to them), so a worker on a
    machine without the world can still build its shard.
    """
    if all((Path(world_root) / rel).is_file() for rel in ANNOTATIONS):
        return Path(world_root)
    root = Path(cache_dir) / wid
    store = ObjectStore(settings.s3)
    for rel in ANNOTATIONS:
        if not (root / rel).is_file():
            _fetch(store, wid, rel, root / rel)
    return root


class ImageResolver:
    """World-relative image path -> local file: the local world, the cache, or a download;
    a ``real:`` path -> the file under ``real_root``."""

    def __init__(
        self,
        settings: Settings,
        wid: str,
        *,
        local_root: Path | None = None,
        cache_dir: Path = DEFAULT_CACHE,
        real_root: Path | None = None,
    ) -> None:
        self.world_id = wid
        self.local_root = Path(local_root) if local_root is not None else None
        self.cache_root = Path(cache_dir) / wid
        # getattr: settings from before ``train.real_root`` existed simply have no real images
        self.real_root = real_root if real_root is not None else getattr(
            settings.train, "real_root", None)
        self.store = ObjectStore(settings.s3)

    def __call__(self, relpath: str) -> Path:
        return self.path(relpath)

    def path(self, relpath: str) -> Path:
        if is_real(relpath):
            return resolve_real(relpath, self.real_root)
        check_relpath(relpath)
        if self.local_root is not None and (self.local_root / relpath).is_file():
            return self.local_root / relpath
        cached = self.cache_root / relpath
        if cached.is_file():
            return cached
        return _fetch(self.store, self.world_id, relpath, cached)

    def read_bytes(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()
