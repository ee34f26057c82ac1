"""Helpers for the fault-injection suite (``test_faults.py``): a private broker and object store
on ports of their own (so the suite can kill them without touching the shared stack), service
processes it SIGKILLs and supervises like a container runtime would, a query probe that records
every answer, a folder feed, and an index reader that counts what it replays.

Nothing here stands in for a server: the broker is Tansu and the object store SeaweedFS, started
the way ``chatreid.app.stack.LocalStack`` starts them, only on other ports and data directories.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from chatreid.config import Settings, revealed

# -- ports -----------------------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, grpc_offset: bool = False, lo: int = 20000, hi: int = 29000) -> list[int]:
    """``n`` free loopback ports; with ``grpc_offset`` each port + 10000 is free too (SeaweedFS
    puts every server's gRPC listener there)."""
    found: list[int] = []
    rng = random.Random(os.getpid() ^ time.time_ns())
    while len(found) < n:
        port = rng.randrange(lo, hi)
        if port in found or not _free(port) or (grpc_offset and not _free(port + 10000)):
            continue
        found.append(port)
    return found


def _wait(check, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not healthy within {timeout_s:.0f}s")


# -- processes -------------------------------------------------------------------------------


class Proc:
    """One OS process group the suite starts, SIGKILLs and restarts; ``supervise`` restarts it
    when it exits by itself (as ``restart: unless-stopped`` or a Kubernetes pod would) and
    counts those exits."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.argv, self.log, self.env, self.cwd = name, argv, log, env, cwd
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0
        self.exits: list[int] = []  # exit codes of exits the suite did not cause
        self.wanted = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            fh.write(f"\n==== start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True)
        self.starts += 1
        self.wanted = True

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean shutdown, no final flush or commit."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def stop(self, timeout_s: float = 20) -> None:
        self.wanted = False
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def supervise(self) -> bool:
        """Restart the process if it exited on its own; returns whether it did."""
        if not self.wanted or self.proc is None or self.proc.poll() is None:
            return False
        self.exits.append(self.proc.returncode)
        self.start()
        return True

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class PrivateStack:
    """A Tansu broker and a SeaweedFS ``weed mini`` of the suite's own, on free ports, with data
    under ``root``; settings pointing at them come from :meth:`settings`."""

    def __init__(self, root: Path) -> None:
        from chatreid.app.stack import tansu_binary, weed_binary

        self.root = root
        self.logs = root / "logs"
        self.kafka_port, = free_ports(1)
        self.s3_port, master, volume, filer, admin = free_ports(5, grpc_offset=True)
        self.access_key = "faults" + os.urandom(4).hex()
        self.secret_key = base64.b32encode(os.urandom(20)).decode().lower()
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        self.broker = Proc("broker", [tansu_binary(), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url], self.logs / "broker.log")
        data = root / "s3"
        data.mkdir(parents=True, exist_ok=True)
        # weed mini opens a master, volume, filer, S3, admin, Iceberg and Lance listener (each
        # also on port + 10000 for gRPC); all moved off the shared stack's fixed ports
        self.s3 = Proc("s3", [
            weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-admin.port={admin}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-volume.max=1000", "-master.volumeSizeLimitMB=64",
        ], self.logs / "s3.log", env={**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
                                       "AWS_SECRET_ACCESS_KEY": self.secret_key}, cwd=root)

    # -- health ------------------------------------------------------------------------------
    def broker_healthy(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.3)
            return s.connect_ex(("127.0.0.1", self.kafka_port)) == 0

    def s3_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.s3_port}/healthz",
                                        timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start_broker(self) -> None:
        self.broker.start()
        _wait(self.broker_healthy, "private Tansu broker", 30)

    def start_s3(self) -> None:
        self.s3.start()
        _wait(self.s3_healthy, "private SeaweedFS", 90)

    def up(self) -> None:
        self.start_broker()
        self.start_s3()

    def down(self) -> None:
        self.s3.stop()
        self.broker.stop()

    def settings(self, base: Settings, tag: str) -> Settings:
        s = base.model_copy(deep=True)
        s.stack.data_dir = self.root
        s.stack.kafka_port, s.stack.s3_port = self.kafka_port, self.s3_port
        s.kafka.bootstrap_servers = f"127.0.0.1:{self.kafka_port}"
        s.s3.endpoint = f"127.0.0.1:{self.s3_port}"
        s.s3.access_key, s.s3.secret_key = self.access_key, self.secret_key
        s.s3.bucket = f"f{tag}"
        s.kafka.topic_prefix = f"f{tag}"
        s.embedder.group_id = f"g{tag}"
        s.index.snapshot_prefix = f"snap-{tag}"
        return s


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for ``python -m chatreid ...`` with every setting a service reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATREID_")}
    for section in ("kafka", "s3", "embedder", "index", "ingestor"):
        for name, value in revealed(getattr(settings, section)).items():
            if value is None:
                continue
            env[f"CHATREID_{section.upper()}__{name.upper()}"] = (
                json.dumps(value) if isinstance(value, list | dict) else str(value))
    env["CHATREID_SITE"] = settings.site
    env.update(extra)
    return env


def chatreid_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "chatreid", *args]


def replica_pids(app: str, deployment: str) -> list[int]:
    """Pids of a Serve deployment's replica actors (Ray titles them
    ``ray::ServeReplica:<app>:<deployment>``)."""
    marker = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


# -- the feed --------------------------------------------------------------------------------


def crop_jpeg(rng: np.random.Generator, valid: bool = True) -> bytes:
    """A person-sized crop: a noisy background with two garment-coloured blocks (each crop's
    bytes differ). Invalid ones: truncated JPEG bytes, or a crop below the minimum side."""
    if valid:
        img = rng.integers(0, 60, size=(128, 64, 3), dtype=np.uint8)
        img[10:64, 8:56] = rng.integers(0, 256, size=3, dtype=np.uint8)
        img[64:120, 12:52] = rng.integers(0, 256, size=3, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        return buf.getvalue()
    if rng.random() < 0.5:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, "JPEG")
        return buf.getvalue()  # too small: image.too_small
    good = crop_jpeg(rng)
    return good[: len(good) // 3]  # truncated: image.corrupt


@dataclass
class Feed:
    """Drops crops into a watched folder (``ROOT/<camera>/<n>.jpg``) atomically (write a hidden
    temp file, rename), each with its own integer-second mtime, so a crop is identified by
    (camera, capture time) whatever the crop-id formula. Every ``invalid_every``-th is invalid."""

    root: Path
    cameras: tuple[str, ...] = ("c1", "c2", "c3", "c4")
    start_epoch: int = 0
    invalid_every: int = 25
    seed: int = 7
    valid: set[tuple[str, int]] = field(default_factory=set)
    invalid: set[tuple[str, int]] = field(default_factory=set)
    written: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()
        if not self.start_epoch:
            self.start_epoch = int(time.time()) - 86_400  # yesterday: never "in the future"

    def write(self, n: int = 1) -> None:
        with self._lock:
            for _ in range(n):
                i = self.written
                camera = self.cameras[i % len(self.cameras)]
                ok = (i + 1) % self.invalid_every != 0
                data = crop_jpeg(self._rng, ok)
                mtime = self.start_epoch + i
                folder = self.root / camera
                folder.mkdir(exist_ok=True)
                tmp = folder / f".{i:06d}.part"
                tmp.write_bytes(data)
                os.utime(tmp, (mtime, mtime))
                tmp.rename(folder / f"{i:06d}.jpg")
                (self.valid if ok else self.invalid).add((camera, mtime))
                self.written += 1

    def snapshot(self) -> frozenset[tuple[str, int]]:
        with self._lock:
            return frozenset(self.valid)

    def path(self, index: int) -> Path:
        return self.root / self.cameras[index % len(self.cameras)] / f"{index:06d}.jpg"

    def index_of(self, key: tuple[str, int]) -> int:
        return key[1] - self.start_epoch

    def image_b64(self, index: int = 0) -> str:
        return base64.b64encode(self.path(index).read_bytes()).decode()

    def pending(self) -> int:
        """Files the ingestor has not marked done yet (its state file, written only after
        its producer flushed a batch)."""
        try:
            done = json.loads((self.root / ".chatreid-ingested.json").read_text())
        except (OSError, ValueError):
            done = []
        return self.written - len(done)


class Dripper(threading.Thread):
    """Writes ``rate_hz`` crops per second into the feed until stopped."""

    def __init__(self, feed: Feed, rate_hz: float) -> None:
        super().__init__(name="feed", daemon=True)
        self.feed, self.period = feed, 1.0 / rate_hz
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            self.feed.write()


def identities(metas) -> Counter:
    """(camera, capture second) of each indexed crop, counted."""
    return Counter((m.camera, round(m.capture_time)) for m in metas)


# -- queries ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    at: float
    phase: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    code: str
    latency_s: float


class QueryProbe(threading.Thread):
    """Asks the API one image query after another (``pause_s`` apart) and records every
    outcome with the phase the suite was in when the query started."""

    def __init__(self, base_url: str, api_key: str, payload: dict, timeout_s: float = 60,
                 pause_s: float = 0.3) -> None:
        super().__init__(name="query-probe", daemon=True)
        self.url = base_url.rstrip("/") + "/v1/query"
        self.headers = {"content-type": "application/json",
                        "authorization": f"Bearer {api_key}"}
        self.body = json.dumps(payload).encode()
        self.timeout_s, self.pause_s = timeout_s, pause_s
        self.phase = "start"
        self.outcomes: list[Outcome] = []
        self.halt = threading.Event()

    def ask(self) -> Outcome:
        phase, t0 = self.phase, time.monotonic()
        request = urllib.request.Request(self.url, data=self.body, headers=self.headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                resp.read()
                status, code = resp.status, "ok"
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                code = json.loads(raw).get("error", "?")
            except ValueError:
                code = "non-json: " + raw[:80].decode(errors="replace")
            status = exc.code
        except TimeoutError:
            status, code = 0, "timeout"
        except OSError as exc:
            status, code = 0, f"{type(exc).__name__}: {exc}"[:120]
        return Outcome(time.time(), phase, status, code, time.monotonic() - t0)

    def run(self) -> None:
        while not self.halt.is_set():
            self.outcomes.append(self.ask())
            self.halt.wait(self.pause_s)

    def burst(self, clients: int, seconds: float) -> list[threading.Thread]:
        """``clients`` more askers, back to back for ``seconds`` (so that queries are in
        flight at any instant); their outcomes join the probe's. Join the threads returned."""
        end = time.monotonic() + seconds

        def ask_until() -> None:
            while time.monotonic() < end:
                self.outcomes.append(self.ask())

        threads = [threading.Thread(target=ask_until, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        return threads

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: answers counted by 'status code', and the slowest answer (s)."""
        table: dict[str, dict[str, float]] = {}
        for o in self.outcomes:
            row = table.setdefault(o.phase, {"max_latency_s": 0.0})
            row[f"{o.status} {o.code}"] = row.get(f"{o.status} {o.code}", 0) + 1
            row["max_latency_s"] = round(max(row["max_latency_s"], o.latency_s), 1)
        return table


# -- the index -------------------------------------------------------------------------------


@dataclass
class Reading:
    """A fresh reader of the index (snapshot, then the log's gap), as a restarted replica
    builds it: what it holds and what it had to replay."""

    restored: bool
    snapshot_vectors: int
    snapshot_offsets: dict[str, int]
    replayed: int  # indexed-log records the reader read after restoring the snapshot
    log_resets: int  # partitions it replayed from the start (the log lost the snapshot's)
    log_records: int  # records in the indexed log (all partitions)
    since_snapshot: int  # of those, written at or after the snapshot's time (minus a margin)
    ids: Counter  # (camera, capture second) -> rows holding it
    rows: int


def read_index(settings: Settings, margin_s: float = 5.0) -> Reading:
    from kafka import TopicPartition

    from chatreid.bus import make_consumer
    from chatreid.prefilter.follower import IndexFollower
    from chatreid.storage import ObjectNotFound, ObjectStore
    from schemas import INDEXED

    objects = ObjectStore(settings.s3)
    try:
        pointer = json.loads(objects.get(f"{settings.index.snapshot_prefix}/latest.json"))
    except ObjectNotFound:
        pointer = {}
    follower = IndexFollower(settings, objects)
    restored = follower.restore()
    snap_vectors = len(follower.store) if follower.store is not None else 0
    follower.catch_up(timeout_s=120)
    replayed = follower.stats.read  # every log record read after the restore
    store = follower.store
    metas = store.live_metas() if store is not None else []
    follower.close()

    # the whole log, with timestamps: how much of it was written after the snapshot (read
    # until caught up with each partition's high watermark: the feed may still be writing)
    topic = settings.kafka.topic(INDEXED.name)
    consumer = make_consumer(settings.kafka, None)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    since = pointer.get("created_at", 0.0) - margin_s
    total = after = 0
    consumer.assign(tps)
    consumer.seek_to_beginning()
    todo, deadline = set(tps), time.monotonic() + 30
    while todo and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=300, max_records=2000).values():
            total += len(records)
            after += sum(1 for r in records if r.timestamp / 1000 >= since)
        for tp in list(todo):
            hw = consumer.highwater(tp)
            if hw is not None and consumer.position(tp) >= hw:
                todo.discard(tp)
                consumer.pause(tp)
    consumer.close()
    return Reading(restored=restored, snapshot_vectors=snap_vectors,
                   snapshot_offsets=dict(pointer.get("offsets", {})), replayed=replayed,
                   log_resets=follower.stats.log_resets,
                   log_records=total, since_snapshot=after, ids=identities(metas),
                   rows=len(store) if store is not None else 0)
