"""Fault injection on the real local stack (issue 14's acceptance): crops stream from a watched
folder through the ingestor (``chatreid ingest folder --watch``) and the embedding service
(``chatreid embed``), both separate processes, into the retrieval app on Ray Serve (tiny VLM,
access control on), while a probe keeps asking image queries. The suite runs a broker and an
object store of its own (own ports and data), so it can kill them, and then, in turn:

1. SIGKILLs the embedder mid-stream and restarts it;
2. SIGKILLs the ingestor mid-batch and restarts it;
3. SIGKILLs the Rerank replica, then the Prefilter replica, while queries run (Serve replaces
   them);
4. stops the object store for 30 s (SIGKILL), then starts it on the same data;
5. SIGKILLs the broker (Tansu keeps topics in memory: the logs, committed offsets and
   producer ids are gone), starts it again and recreates the topics (``chatreid init``).

A process that exits by itself is restarted after a second, as a container runtime would
(compose: ``restart: unless-stopped``); those exits are reported. After each fault the suite
waits until the index stops growing and records which crops written during that fault's window
are missing or indexed twice. Then it asserts: every valid crop is searchable exactly once
(counted on a fresh reader and on the serving app), invalid crops never are, no query answered
a 5xx other than a documented 503, and a restarted reader resumes from the snapshot, replaying
only the log written after it.

What "exactly once" means after the broker loss: a crop counts as ingested once its folder
entry is marked done (its event was acknowledged). Acknowledged crop events that the embedder
had not consumed die with the broker, so the product must bring them back (the ingest source
re-publishes what was acknowledged by a broker that no longer holds it; crop ids are
deterministic, so a re-publish never duplicates); the readers keep what they hold and must
not skip records of the new log. The suite asks for exactly that: every valid file in the
folder indexed once, with no manual step beyond recreating the topics.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatreid.config import Settings

from .faults_stack import (
    Dripper,
    Feed,
    PrivateStack,
    Proc,
    QueryProbe,
    Reading,
    chatreid_cmd,
    free_ports,
    identities,
    read_index,
    replica_pids,
    service_env,
)

pytestmark = [pytest.mark.stack, pytest.mark.faults]

# 503 answers a client may get while a part of the system is down; each names what is missing
# and is documented in docs/api.md's list of errors (with Retry-After where it is transient).
ACCEPTED_503 = {
    "model.unavailable",  # no VLM loaded (none deployed yet, or none left to fall back to)
    "storage.unavailable",  # the object store does not answer (crop images for the dialogue)
    "audit.unavailable",  # the audit entry every query leaves cannot be written
    "auth.unavailable",  # the key store (object storage) cannot be read to check a key
    "replica.unavailable",  # a back-end replica died mid-request and no other could answer
}
RATE_HZ = 3.0  # crops per second the feed writes
OUTAGE_S = 30.0  # how long the object store stays down


@dataclass
class PhaseResult:
    name: str
    window: int  # valid crops written during the phase's window
    missing_window: list  # of those, not indexed after settling
    missing_all: int  # valid crops written so far that are not indexed
    duplicated: list  # (camera, second) held by more than one row
    invalid_indexed: list
    gallery: int | None  # what the serving app reports
    expected: int
    settle_s: float
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaultRun:
    settings: Settings
    feed: Feed
    probe: QueryProbe
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    readings: dict[str, Reading] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    final_gallery: int | None = None
    searches: list[tuple[tuple[str, int], int, str]] = field(default_factory=list)
    final_expected: int = 0
    error: str | None = None  # the scenario's own failure, if it stopped early
    timeline: list[tuple[float, str]] = field(default_factory=list)


class Scenario:
    def __init__(self, run: FaultRun, stack: PrivateStack, client, logs) -> None:
        self.run, self.stack, self.client, self.logs = run, stack, client, logs
        self.lock = threading.Lock()  # the suite's own kills vs the supervisor's restarts
        self.tail = None  # an index reader following the log in this process
        self.seen_before: frozenset = frozenset()
        self.t0 = time.monotonic()
        self.halt = threading.Event()
        self.supervisor = threading.Thread(target=self._supervise, daemon=True)
        self.tail_last: Counter = Counter()

    # -- bookkeeping ---------------------------------------------------------------------------
    def mark(self, what: str) -> None:
        self.run.timeline.append((round(time.monotonic() - self.t0, 1), what))

    def _supervise(self) -> None:
        while not self.halt.wait(1.0):
            with self.lock:
                for proc in self.run.procs.values():
                    if proc.supervise():
                        self.mark(f"{proc.name} exited by itself (code {proc.exits[-1]}); "
                                  "restarted")

    def restart(self, proc: Proc, down_s: float = 1.0) -> None:
        with self.lock:
            proc.kill()
            self.mark(f"SIGKILL {proc.name}")
            time.sleep(down_s)
            proc.start()

    def gallery(self) -> int | None:
        try:
            return int(self.client.health().get("gallery", 0))
        except Exception:
            return None

    def indexed(self) -> Counter:
        from chatreid.prefilter.follower import IndexFollower

        try:
            if self.tail is None:
                self.tail = IndexFollower(self.run.settings)
            for _ in range(20):
                if not self.tail.poll(timeout_ms=200):
                    break
            store = self.tail.store
            return identities(store.live_metas()) if store is not None else Counter()
        except Exception as exc:  # the broker may be down: the next call retries
            self.mark(f"tail reader: {type(exc).__name__}: {exc}"[:200])
            return self.tail_last

    def settle(self, name: str, stall_s: float = 20.0, limit_s: float = 90.0, **notes) -> None:
        """Wait until every valid crop written so far is indexed, or nothing new was indexed
        for ``stall_s``; record what the phase's window lost or duplicated."""
        self.run.probe.phase = f"{name} (settling)"
        expected = self.run.feed.snapshot()
        t0 = time.monotonic()
        last_change, last = t0, None
        while True:
            ids = self.indexed()
            self.tail_last = ids
            have = set(ids)
            gallery = self.gallery()  # the serving app's index, a refresh behind the log
            if ((expected <= have and (gallery or 0) >= len(expected))
                    or time.monotonic() - t0 > limit_s):
                break
            if (len(have), gallery) != last:
                last, last_change = (len(have), gallery), time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                break
            time.sleep(0.5)
        window = expected - self.seen_before
        self.seen_before = expected
        if self.tail is not None and not expected <= have:  # for the failure message
            notes["tail_reader"] = self.tail.stats.log_summary()
        result = PhaseResult(
            name=name, window=len(window), missing_window=sorted(window - have),
            missing_all=len(expected - have), duplicated=sorted(k for k, n in ids.items() if n > 1),
            invalid_indexed=sorted(have & self.run.feed.invalid), gallery=gallery,
            expected=len(expected), settle_s=round(time.monotonic() - t0, 1), notes=notes)
        self.run.phases[name] = result
        self.mark(f"settled {name}: {len(expected)} expected, {len(have)} indexed, "
                  f"gallery {gallery}, window missing {len(result.missing_window)}")

    def stream(self, seconds: float) -> None:
        time.sleep(seconds)


def partitions(settings: Settings) -> dict[str, int]:
    """Partitions of the crops and indexed topics (a client that asks for a missing topic
    makes Tansu create it with its own default count)."""
    from chatreid.bus import make_consumer
    from schemas import CROPS, INDEXED

    consumer = make_consumer(settings.kafka, None)
    try:
        return {t.name: len(consumer.partitions_for_topic(settings.kafka.topic(t.name)) or ())
                for t in (CROPS, INDEXED)}
    finally:
        consumer.close()


def search_each(feed: Feed, settings: Settings, rng_seed: int, n: int = 24) -> list:
    """Ask the app with the image of ``n`` valid crops (spread over the whole run, so over
    every fault's window); each must come back as its own best match. Returns
    (crop, status, what came back)."""
    import base64
    import random

    from chatreid.client import ApiError, RetrievalClient
    from schemas import QueryRequest

    client = RetrievalClient(settings.serve.base_url, timeout_s=60,
                             api_key=settings.serve.api_key.get_secret_value())
    valid = sorted(feed.snapshot())
    picks = sorted(random.Random(rng_seed).sample(valid, min(n, len(valid))))
    out = []
    for key in picks:
        data = feed.path(feed.index_of(key)).read_bytes()
        request = QueryRequest(kind="standard", image_b64=base64.b64encode(data).decode(),
                               k=1, top=1)
        try:
            top = client.query(request).results[0]
            found = (top.camera, round(top.capture_time.timestamp()))
            out.append((key, 200, "itself" if found == key else f"other: {found}"))
        except ApiError as exc:
            out.append((key, exc.status, exc.error))
    return out


def _wait_queries_ok(probe: QueryProbe, since: float, timeout_s: float) -> float | None:
    """Seconds until the first successful query started after ``since``; None if none."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for o in probe.outcomes[-20:]:
            if o.at - o.latency_s >= since and o.status == 200:
                return round(o.at - since, 1)
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def fault_run(stack_base, ray_session, tmp_path_factory):
    from ray import serve

    from chatreid.bus import ensure_topics
    from chatreid.client import RetrievalClient
    from chatreid.query import ModelSpec
    from chatreid.storage import ObjectStore
    from services.retrieval.app import deploy

    root = tmp_path_factory.mktemp("faults")
    stack = PrivateStack(root / "stack")
    stack.up()
    tag = secrets.token_hex(4)
    settings = stack.settings(stack_base, tag)
    settings.kafka.partitions = 3
    settings.embedder.batch_size = 8
    settings.embedder.height, settings.embedder.width = 128, 64
    settings.embedder.session_timeout_ms, settings.embedder.heartbeat_interval_ms = 6000, 2000
    settings.index.snapshot_every_events, settings.index.snapshot_every_s = 40, 3.0
    # its own app name: replicas are found by process title, and another run of this suite
    # on the machine (a colleague's, CI's) must never lose its replicas to this one
    settings.serve.app_name = f"faults{tag}"
    settings.serve.http_port = free_ports(1, lo=8300, hi=8999)[0]
    settings.serve.api_key = "faults-" + secrets.token_urlsafe(24)  # access control on
    settings.serve.rerank_num_cpus, settings.serve.light_num_cpus = 0.25, 0.05
    settings.serve.refresh_every_s = 0.5
    settings.access.rate_per_minute = 100_000  # the probe must not meet the rate limit
    ObjectStore(settings.s3).ensure_bucket()
    ensure_topics(settings.kafka)

    logs = root / "logs"
    feed = Feed(root / "feed")
    feed.write(30)
    env = service_env(settings)
    procs = {
        "embedder": Proc("embedder", chatreid_cmd("embed", "--verbose"), logs / "embedder.log",
                         env),
        "ingestor": Proc("ingestor", chatreid_cmd("ingest", "folder", str(feed.root), "--watch",
                                                  "--verbose"), logs / "ingestor.log", env),
    }
    client = RetrievalClient(settings.serve.base_url, timeout_s=30,
                             api_key=settings.serve.api_key.get_secret_value())
    probe = QueryProbe(settings.serve.base_url, settings.serve.api_key.get_secret_value(),
                       {"kind": "standard", "image_b64": feed.image_b64(0), "k": 3, "top": 3})
    run = FaultRun(settings=settings, feed=feed, probe=probe, procs=procs)
    sc = Scenario(run, stack, client, logs)
    dripper = Dripper(feed, RATE_HZ)
    try:
        for proc in procs.values():
            proc.start()
        sc.supervisor.start()
        deploy(settings, ModelSpec.of_base("tiny"))
        client.wait_ready(gallery=1, timeout_s=180)
        sc.mark("app ready")
        probe.start()
        dripper.start()
        sc.settle("warm-up")

        # 1. the embedder, mid-stream
        probe.phase = "embedder SIGKILL"
        sc.stream(5)
        sc.restart(procs["embedder"])
        sc.stream(6)
        sc.settle("embedder SIGKILL")

        # 2. the ingestor, mid-batch: a burst it is still publishing when it dies (the folder
        #    source marks a batch of 64 done once its producer flushed)
        probe.phase = "ingestor SIGKILL"
        feed.write(150)  # three of its batches: kill once the first is done
        deadline = time.monotonic() + 15
        while not 0 < feed.pending() <= 150 - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        pending_at_kill = feed.pending()
        sc.restart(procs["ingestor"])
        sc.stream(5)
        sc.settle("ingestor SIGKILL", pending_at_kill=pending_at_kill)
        run.readings["after process kills"] = read_index(settings)

        # 3. Serve replicas, while queries run
        for deployment in ("Rerank", "Prefilter"):
            probe.phase = f"{deployment} replica SIGKILL"
            pids = replica_pids(settings.serve.app_name, deployment)
            assert pids, f"no {deployment} replica process found"
            burst = probe.burst(clients=4, seconds=4.0)  # queries in flight at the kill
            time.sleep(1.5)
            killed_at = time.time()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            sc.mark(f"SIGKILL {deployment} replica {pids}")
            for t in burst:
                t.join()
            recovered = _wait_queries_ok(probe, killed_at, timeout_s=90)
            sc.stream(3)
            sc.settle(f"{deployment} replica SIGKILL", pids=pids, queries_ok_after_s=recovered)

        # 4. the object store, 30 s, with crops in flight: the embedder is held (SIGSTOP, for
        # less than its session timeout) while the ingestor publishes a burst, so it meets the
        # outage with a backlog of crops it cannot fetch
        probe.phase = "object store down"
        with sc.lock:
            embedder_pid = procs["embedder"].pid
            os.killpg(embedder_pid, signal.SIGSTOP)
            feed.write(30)
            time.sleep(2.5)  # the ingestor polls the folder every second
            stack.s3.kill()
            os.killpg(embedder_pid, signal.SIGCONT)
        sc.mark("SIGKILL object store (30 crops waiting for the embedder)")
        time.sleep(OUTAGE_S)
        stack.start_s3()
        sc.mark("object store back")
        probe.phase = "object store back"
        sc.stream(5)
        sc.settle("object store down 30s")

        # 5. the broker
        probe.phase = "broker SIGKILL"
        with sc.lock:
            stack.broker.kill()
        sc.mark("SIGKILL broker")
        time.sleep(1.0)
        stack.start_broker()
        created = ensure_topics(settings.kafka)  # chatreid init: the topics, as configured
        sc.mark(f"broker back, {len(created)} topics recreated")
        sc.stream(8)
        dripper.halt.set()
        dripper.join()
        sc.settle("broker SIGKILL", stall_s=25, recreated_by_init=len(created),
                  partitions=partitions(settings))

        probe.phase = "final"
        run.final_expected = len(feed.snapshot())
        run.final_gallery = sc.gallery()
        run.searches = search_each(feed, settings, rng_seed=len(feed.valid))
        time.sleep(max(0.0, settings.index.snapshot_every_s * 2))
        run.readings["final"] = read_index(settings)
        sc.mark("final reading")
    except Exception:
        run.error = traceback.format_exc()
    finally:
        probe.halt.set()
        dripper.halt.set()
        sc.halt.set()
        for proc in procs.values():
            proc.stop()
        _report(run, logs)
        serve.shutdown()
        stack.down()
    yield run


def _report(run: FaultRun, logs) -> None:
    """What happened, for a human: printed (pytest -s) and written beside the logs."""
    report = {
        "timeline": run.timeline,
        "phases": {n: {k: v for k, v in vars(p).items()
                       if k not in ("missing_window", "duplicated", "invalid_indexed")}
                   | {"missing_window": len(p.missing_window), "duplicated": len(p.duplicated),
                      "invalid_indexed": len(p.invalid_indexed)}
                   for n, p in run.phases.items()},
        "queries": run.probe.summary(),
        "readings": {n: {k: v for k, v in vars(r).items() if k != "ids"}
                     | {"distinct": len(r.ids)} for n, r in run.readings.items()},
        "processes": {n: {"starts": p.starts, "kills": p.kills, "exits": p.exits}
                      for n, p in run.procs.items()},
        "valid": len(run.feed.valid), "invalid": len(run.feed.invalid),
        "final_gallery": run.final_gallery,
        "searches": Counter(what for _, _, what in run.searches),
    }
    text = json.dumps(report, indent=1, default=str)
    (logs / "report.json").write_text(text)
    print(f"\nfault run report ({logs}):\n{text}")


# -- each fault on its own -------------------------------------------------------------------


def _phase(run: FaultRun, name: str) -> PhaseResult:
    if name not in run.phases:
        pytest.fail(f"the scenario stopped before {name!r}: {run.error}")
    return run.phases[name]


def _assert_window(run: FaultRun, phase: str) -> None:
    p = _phase(run, phase)
    assert p.window > 0, f"{phase}: no crops were streamed during the fault"
    tail_marks = [m for m in run.timeline if "tail reader" in m[1]][-3:]
    assert not p.missing_window, (
        f"{phase}: {len(p.missing_window)} of the {p.window} valid crops written during the "
        f"fault are not indexed (e.g. {p.missing_window[:3]}); the serving app holds "
        f"{p.gallery} of {p.expected}; notes {p.notes}; tail reader errors {tail_marks}")
    assert not p.duplicated, f"{phase}: indexed twice: {p.duplicated[:5]}"
    assert not p.invalid_indexed, f"{phase}: invalid crops indexed: {p.invalid_indexed[:5]}"


def test_embedder_sigkilled_mid_stream_loses_and_duplicates_nothing(fault_run) -> None:
    assert fault_run.procs["embedder"].kills >= 1
    _assert_window(fault_run, "embedder SIGKILL")


def test_ingestor_sigkilled_mid_batch_loses_and_duplicates_nothing(fault_run) -> None:
    assert fault_run.procs["ingestor"].kills >= 1
    _assert_window(fault_run, "ingestor SIGKILL")


def test_serve_replicas_sigkilled_are_replaced_and_queries_recover(fault_run) -> None:
    for deployment in ("Rerank", "Prefilter"):
        phase = f"{deployment} replica SIGKILL"
        p = _phase(fault_run, phase)
        assert p.notes["queries_ok_after_s"] is not None, f"{phase}: queries never recovered"
        _assert_window(fault_run, phase)
        # the replaced prefilter replica rebuilt the whole index (snapshot + log); the feed
        # kept writing meanwhile, so it may hold more
        assert (p.gallery or 0) >= p.expected, (
            f"{phase}: the app serves {p.gallery} crops, fewer than the {p.expected} written")


def test_object_store_down_30s_loses_no_crop(fault_run) -> None:
    """Crops in flight while the object store is down are retried, not dead-lettered, and
    crops arriving meanwhile are ingested once it is back."""
    _assert_window(fault_run, "object store down 30s")


def test_broker_sigkilled_and_restarted_loses_and_duplicates_nothing(fault_run) -> None:
    p = _phase(fault_run, "broker SIGKILL")
    _assert_window(fault_run, "broker SIGKILL")
    assert p.missing_all == 0, (
        f"after the broker loss {p.missing_all} of {p.expected} valid crops are not indexed")


# -- the acceptance --------------------------------------------------------------------------


def test_every_valid_crop_is_searchable_exactly_once(fault_run) -> None:
    """A fresh reader (snapshot + log, as a restarted replica builds it) and the serving app
    both hold every valid crop of the folder once, and no invalid one."""
    run = fault_run
    if "final" not in run.readings:
        pytest.fail(f"the scenario stopped early: {run.error}")
    final = run.readings["final"]
    valid, have = run.feed.snapshot(), set(final.ids)
    assert not (have & run.feed.invalid), "invalid crops were indexed"
    dupes = {k: n for k, n in final.ids.items() if n > 1}
    assert not dupes, f"crops indexed more than once: {list(dupes.items())[:5]}"
    assert final.rows == len(final.ids)
    missing = valid - have
    assert not missing, (f"{len(missing)} of {len(valid)} valid crops are not searchable "
                         f"(e.g. {sorted(missing)[:3]})")
    assert have == valid
    assert run.final_gallery == len(valid), (
        f"the serving app holds {run.final_gallery} crops, not {len(valid)}")


def test_valid_crops_from_every_fault_window_are_found_by_their_own_image(fault_run) -> None:
    searches = fault_run.searches
    if not searches:
        pytest.fail(f"the scenario stopped early: {fault_run.error}")
    wrong = [(key, status, what) for key, status, what in searches if what != "itself"]
    assert not wrong, (f"{len(wrong)} of {len(searches)} crops are not their own image's best "
                       f"match over the API: {wrong[:4]}")


def test_no_query_during_the_faults_answers_an_undocumented_5xx(fault_run) -> None:
    outcomes = fault_run.probe.outcomes
    assert sum(o.status == 200 for o in outcomes) >= 20, "the probe hardly got any answer"
    bad = [(o.phase, o.status, o.code) for o in outcomes
           if o.status >= 500 and not (o.status == 503 and o.code in ACCEPTED_503)]
    lost = [(o.phase, o.code) for o in outcomes if o.status == 0]
    assert not bad, (f"{len(bad)} of {len(outcomes)} queries answered an undocumented 5xx: "
                     f"{Counter(bad).most_common(6)}")
    # documented: named in the API's list of errors (testing.md's account of this suite, which
    # lists what it accepts, does not count)
    docs = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    seen = {o.code for o in outcomes if o.status == 503}
    assert all(code in docs for code in seen), (
        f"503 codes answered but not documented in docs/api.md: {sorted(seen)}")
    assert not lost, f"{len(lost)} queries got no HTTP answer: {Counter(lost).most_common(6)}"


def test_a_restarted_reader_resumes_from_the_snapshot_and_replays_only_the_gap(fault_run) -> None:
    if len(fault_run.readings) < 2:
        pytest.fail(f"the scenario stopped early: {fault_run.error}")
    for name, reading in fault_run.readings.items():
        assert reading.restored and reading.snapshot_vectors > 0, f"{name}: no snapshot restored"
        # the snapshot plus the replayed gap is the whole index: nothing was read twice
        assert reading.snapshot_vectors + reading.replayed >= reading.rows
        # replayed: records consumed after the restore; since_snapshot: records written at or
        # after the snapshot's time (less a margin) - an upper bound for the gap
        assert reading.replayed <= reading.since_snapshot, (
            f"{name}: replayed {reading.replayed} of {reading.log_records} log records, but only "
            f"{reading.since_snapshot} were written after the snapshot")
        assert reading.replayed < reading.log_records or reading.log_records == 0
