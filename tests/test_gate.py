"""The rollout gate: a worse embedder or a VLM that makes answers worse never serves unforced."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest

from chatreid.config import Settings
from chatreid.embedder import Embedder, ReIDNet, build_embedder
from chatreid.evaluation.gate import (
    GateError,
    HeldOut,
    judge_embedder,
    judge_vlm,
    validation_metrics,
    validation_parts,
)

from .conftest import SHARED

REAL = SHARED / "data" / "cuhk03-pair1"


def gated(settings: Settings, world: Path, **changes) -> Settings:
    s = settings.model_copy(deep=True)
    s.gate.synthetic_root = world
    for key, value in changes.items():
        setattr(s.gate, key, value)
    return s


def random_embedder() -> Embedder:
    """Untrained weights: a real embedder, and a clearly worse one than ImageNet's."""
    import torch

    torch.manual_seed(0)
    return Embedder(ReIDNet(), model_id="random-init", height=128, width=64)


def test_a_worse_embedder_is_refused_with_both_figures(world: Path) -> None:
    settings = gated(Settings(), world)
    imagenet = build_embedder(height=128, width=64)
    verdict = judge_embedder(settings, random_embedder(), imagenet)
    assert not verdict.passed
    assert verdict.candidate["gate/mAP"] < verdict.serving["gate/mAP"]
    assert verdict.candidate["gate/synthetic_mAP"] == verdict.candidate["gate/mAP"]  # one part
    assert f"{verdict.serving['gate/mAP']:.4f}" in verdict.reason
    assert judge_embedder(settings, imagenet, random_embedder()).passed  # the other way round
    assert judge_embedder(settings, imagenet, imagenet).passed  # equal is not worse


def test_the_slice_is_capped_to_the_same_held_out_people_every_time(world: Path) -> None:
    settings = gated(Settings(), world, max_people=2)  # the tiny world has 4 query people
    ((name, task, root),) = validation_parts(settings)
    assert (name, task.name, root) == ("synthetic", "synth_standard", world)
    a, b = task.load(root), task.load(root)
    people = {r.pid for r in a.query}
    assert len(people) == 2 and people == {r.pid for r in a.gallery} == {r.pid for r in b.query}
    assert [r.path for r in a.gallery] == [r.path for r in b.gallery]  # deterministic
    whole = HeldOut.of(task, None).load(root)
    assert len(whole.query) > len(a.query) and {r.pid for r in whole.query} > people
    everyone = HeldOut.of(task, 10_000).load(root)  # a cap above the count: all of them
    assert {r.pid for r in everyone.query} == {r.pid for r in whole.query} & {
        r.pid for r in whole.gallery}


@pytest.mark.shared("data/cuhk03-pair1")
def test_real_validation_people_are_a_second_part() -> None:
    settings = Settings()
    settings.gate.synthetic, settings.gate.real_root, settings.gate.max_people = False, REAL, 20
    figures = validation_metrics(settings, build_embedder())
    assert set(figures) == {"gate/real_mAP", "gate/real_rank1", "gate/mAP", "gate/rank1"}
    assert 0 < figures["gate/real_mAP"] == figures["gate/mAP"] < 0.5


def test_an_unreadable_validation_set_is_an_error_naming_it(world: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-world"
    with pytest.raises(GateError, match=f"synthetic validation set {missing} cannot be read"):
        validation_metrics(gated(Settings(), missing), build_embedder())
    broken = tmp_path / "real"
    (broken / "train").mkdir(parents=True)
    with pytest.raises(GateError, match=f"real validation set {broken} cannot be read"):
        validation_metrics(gated(Settings(), world, real_root=broken), build_embedder())
    with pytest.raises(GateError, match="no validation set"):
        validation_metrics(gated(Settings(), world, synthetic=False), build_embedder())


class Reversed:
    """The tiny VLM with its picks put in reverse order: a reranker that makes answers worse
    (the random tiny model itself keeps the prefilter's order: it changes nothing)."""

    def __init__(self, runtime) -> None:
        self.inner, self.reranker = runtime.reranker, self

    def rerank(self, query, candidates):
        result = self.inner.rerank(query, candidates)
        picked = [r for r in result.ranking if r.reranked][::-1]
        rest = [r for r in result.ranking if not r.reranked]
        ranking = [dataclasses.replace(r, rank=i + 1) for i, r in enumerate(picked + rest)]
        return dataclasses.replace(result, ranking=ranking)


def test_a_vlm_that_reranks_below_the_prefilter_is_refused(world: Path) -> None:
    from chatreid.query import ModelSpec, VLMRuntime

    settings = gated(Settings(), world, vlm_queries=8, vlm_k=5)
    runtime = VLMRuntime.load(settings, ModelSpec.of_base("tiny"))  # random weights
    prefilter = build_embedder(height=128, width=64)
    unchanged = judge_vlm(settings, runtime, prefilter)
    assert unchanged.passed and unchanged.candidate == unchanged.serving  # no worse: passes
    verdict = judge_vlm(settings, Reversed(runtime), prefilter)
    assert not verdict.passed
    assert verdict.candidate["gate/mAP"] < verdict.serving["gate/mAP"] == unchanged.serving[
        "gate/mAP"]
    assert re.search(r"below the prefilter alone \(0\.\d+\) on \d+ held-out queries",
                     verdict.reason)


def test_the_vlm_gate_judges_over_the_shortlist_the_site_serves(world: Path) -> None:
    """A site serving the k-reciprocal shortlist gates its VLM over that shortlist: the
    prefilter figure is the k-reciprocal order's, not the cosine order's."""
    from chatreid.query import ModelSpec, VLMRuntime

    settings = gated(Settings(), world, vlm_queries=8, vlm_k=5)
    runtime = VLMRuntime.load(settings, ModelSpec.of_base("tiny"))
    prefilter = build_embedder(height=128, width=64)
    cosine = judge_vlm(settings, runtime, prefilter)
    settings.serve.shortlist_order, settings.serve.k_reciprocal_pool = "k_reciprocal", 30
    served = judge_vlm(settings, runtime, prefilter)
    assert served.serving["gate/mAP"] != cosine.serving["gate/mAP"]
    assert served.passed  # the tiny model keeps the order it is given: no worse


def test_the_operator_api_forces_only_with_a_reason() -> None:
    from pydantic import ValidationError

    from schemas.console import RolloutRequest

    assert RolloutRequest(model="latest").kind == "vlm"  # as before: a VLM rollout
    with pytest.raises(ValidationError, match="force needs a reason"):
        RolloutRequest(model="hpt3-x", force=True)
    with pytest.raises(ValidationError, match="force needs a reason"):
        RolloutRequest(model="hpt3-x", force=True, reason="  ")
    with pytest.raises(ValidationError, match="only a forced override"):
        RolloutRequest(model="embedder-x", kind="embedder")
    forced = RolloutRequest(model="embedder-x", kind="embedder", force=True, reason="site test")
    assert (forced.kind, forced.force, forced.reason) == ("embedder", True, "site test")
    with pytest.raises(ValidationError):
        RolloutRequest(model="x" * 301)


# -- in the running services -----------------------------------------------------------------


@pytest.mark.stack
def test_the_embedding_service_refuses_a_worse_embedder_until_forced(settings, world,
                                                                     tmp_path) -> None:
    """Two replicas: the reindexing one judges and announces, the other follows its verdict.
    A worse embedder is refused once (both figures on the event, in the listing) while both keep
    indexing and queries keep answering; a forced override is audited and rolls it on both."""
    from typer.testing import CliRunner

    from chatreid.app.cli import app
    from chatreid.audit import AuditLog
    from chatreid.checkpoints import push
    from chatreid.prefilter.search import PrefilterSearch
    from chatreid.storage import ObjectStore
    from schemas import DEPLOYMENTS, DeploymentEvent

    from .conftest import env_for, read_events
    from .test_embedder_training import Running, ingest, searchable, wait_for

    settings.gate.synthetic_root = world
    crops = ingest(settings, 8, seed=11)
    running = Running(settings)  # the snapshot replica: it judges and rebuilds
    other = Running(settings, snapshots=False, reindex=False)  # follows its verdict
    try:
        reader = PrefilterSearch(settings)
        wait_for(searchable(reader, 8))
        old = reader.version
        worse = random_embedder()
        worse.save(tmp_path / "worse" / "embedder.pt")
        figures = validation_metrics(settings, worse)  # what a push site puts in the manifest
        event = push(settings, tmp_path / "worse", model="embedder", stage="embedder",
                     version=worse.version, metrics=figures)

        (refused,) = read_events(settings, DEPLOYMENTS, DeploymentEvent, 1, timeout_s=120)
        assert (refused.model, refused.status, refused.version) == ("embedder", "refused",
                                                                    event.version)
        assert refused.previous_version == old and not refused.forced
        assert refused.candidate == pytest.approx(figures, abs=1e-4)  # as at the push site
        assert refused.candidate["gate/mAP"] < refused.serving["gate/mAP"]
        assert "below the serving embedder" in (refused.reason or "")
        wait_for(lambda: other.node.rollout.refused == [event.version])  # told, not waiting
        assert running.node.rollout.refused == [event.version]
        # the current embedder keeps serving and indexing, on both replicas
        assert running.node.service.versions == other.node.service.versions == [old]
        later = ingest(settings, 6, seed=12)
        wait_for(searchable(reader, 14))
        assert reader.version == old
        assert reader.search(reader.crop_image(later[0].crop_id), k=1)[0].crop_id == \
            later[0].crop_id
        listing = CliRunner().invoke(app, ["checkpoints", "--model", "embedder"],
                                     env={**env_for(settings), "COLUMNS": "240"})
        assert listing.exit_code == 0, listing.output
        row = next(line for line in listing.output.splitlines() if event.version in line)
        assert f"{figures['gate/mAP']:.3f}" in row and "refused" in row, listing.output

        # an operator forces it: audited, announced again, rolled with its figures reported
        result = CliRunner().invoke(app, ["force", event.version, "--model", "embedder",
                                          "--reason", "accepted for a site test"],
                                    env=env_for(settings))
        assert result.exit_code == 0, result.output
        for node in (running.node, other.node):
            wait_for(lambda n=node: n.service.versions == [event.version], timeout_s=120)
        wait_for(lambda: reader.refresh() and reader.version == event.version, timeout_s=60)
        assert reader.index.active()[1].crop_ids() == {c.crop_id for c in crops + later}
    finally:
        other.stop()
        running.stop()
    steps = read_events(settings, DEPLOYMENTS, DeploymentEvent, 4, timeout_s=10)
    assert [(e.status, e.forced) for e in steps] == [("refused", False), ("started", True),
                                                     ("completed", True)]  # one announcer
    assert "forced by cli:" in (steps[1].reason or "")
    assert steps[1].candidate == pytest.approx(figures, abs=1e-4)  # its figures still reported
    (entry,) = AuditLog(settings, ObjectStore(settings.s3)).export(action="checkpoint.force")
    assert entry.target == f"embedder:{event.version}"
    assert entry.detail == "accepted for a site test"


@pytest.mark.stack
def test_a_vlm_rollout_with_an_unreadable_validation_set_is_refused_until_forced(
        settings, tmp_path) -> None:
    from chatreid.checkpoints import force
    from chatreid.query import ModelSpec
    from services.retrieval.vlm_rollout import VLMRollout

    from .test_serve import _push_tiny

    missing = tmp_path / "world-gone"
    settings.gate.synthetic_root = missing
    deployed: list[str | None] = []
    rollout = VLMRollout(settings, ModelSpec.of_base("tiny"),
                         deployer=lambda _s, spec: deployed.append(spec.version if spec else None))
    try:
        pushed = _push_tiny(settings, tmp_path, "tiny-ft-gated")
        refused = rollout.step(timeout_ms=5000)
        assert refused is not None and refused.status == "refused", refused
        assert f"validation set {missing} cannot be read" in (refused.reason or "")
        assert deployed == [] and rollout.current == ModelSpec.of_base("tiny")
        assert rollout.step(timeout_ms=1000) is None  # refused once, not retried

        force(settings, "vlm", pushed.version, by="test", reason="validation data offline")
        done = rollout.step(timeout_ms=5000)
        assert done is not None and (done.status, done.forced) == ("completed", True)
        assert "forced by test: validation data offline" in (done.reason or "")
        assert deployed == [pushed.version] and rollout.current.version == pushed.version
    finally:
        rollout.close()


@pytest.mark.stack
def test_the_vlm_rollout_refuses_a_reranker_below_the_prefilter_with_both_figures(
        settings, world, tmp_path, monkeypatch) -> None:
    """The watcher's own path: verified, smoke-tested, then judged and refused with both
    figures; nothing deploys; the operator API's check then sees the standing refusal."""
    from chatreid.query import ModelSpec, VLMRuntime
    from services.retrieval import ops, vlm_rollout

    from .test_serve import _push_tiny

    settings.gate.synthetic_root, settings.gate.vlm_queries = world, 8
    load = VLMRuntime.load

    class Worse(Reversed):  # the checkpoint's runtime, its picks reversed
        def __init__(self, runtime) -> None:
            super().__init__(runtime)
            self.smoke = runtime.smoke

    monkeypatch.setattr(vlm_rollout.VLMRuntime, "load",
                        classmethod(lambda cls, s, spec: Worse(load(s, spec))))
    deployed: list[str | None] = []
    rollout = vlm_rollout.VLMRollout(settings, ModelSpec.of_base("tiny"),
                                     deployer=lambda _s, spec: deployed.append(spec.version))
    try:
        pushed = _push_tiny(settings, tmp_path, "tiny-ft-worse")
        refused = rollout.step(timeout_ms=5000)
        assert refused is not None and (refused.model, refused.status) == ("vlm", "refused")
        assert refused.candidate["gate/mAP"] < refused.serving["gate/mAP"]
        assert "below the prefilter alone" in (refused.reason or "")
        assert deployed == [] and rollout.current == ModelSpec.of_base("tiny")
        assert rollout.step(timeout_ms=1000) is None  # refused once, not judged again
    finally:
        rollout.close()
    standing = ops.gate_refusal(settings, "vlm", pushed.version)  # POST /v1/ops/rollout: 409
    assert standing is not None and standing.candidate == refused.candidate
    assert ops.gate_refusal(settings, "vlm", "tiny-ft-other") is None


@pytest.mark.stack
def test_the_vlm_push_site_puts_the_gate_figures_in_the_manifest(settings, world,
                                                                 tmp_path) -> None:
    from chatreid.model import build_model, save_checkpoint
    from ray_jobs.hpt import _gate_figures

    settings.gate.synthetic_root, settings.gate.vlm_queries = world, 4
    model_dir = save_checkpoint(*build_model("tiny"), tmp_path / "stage3")
    figures = _gate_figures(settings, model_dir)
    assert set(figures) == {"gate/mAP", "gate/rank1", "gate/synthetic_mAP",
                            "gate/synthetic_rank1", "gate/prefilter_mAP", "gate/prefilter_rank1"}
    assert 0 < figures["gate/prefilter_mAP"] <= 1
    settings.gate.synthetic_root = tmp_path / "gone"  # figures never fail a training run
    assert _gate_figures(settings, model_dir) == {}


@pytest.mark.stack
def test_the_operator_api_refuses_a_gated_version_unless_forced_and_audits_the_override(
        stack_base, ray_session, tmp_path) -> None:
    from ray import serve

    from chatreid.audit import AuditLog
    from chatreid.bus import make_producer, publish
    from chatreid.client import ApiError
    from chatreid.storage import ObjectStore
    from schemas import CHECKPOINTS, DEPLOYMENTS, CheckpointEvent, DeploymentEvent
    from services.ingestor.sources import synth_source

    from .conftest import deploy_site, namespace, read_events
    from .test_serve import _push_tiny

    gen = namespace(stack_base)
    settings = next(gen)
    try:
        client, _ = deploy_site(settings, list(synth_source(3, 8, None, start_time=1.7e9)),
                                port=8021, api_key="gate-bootstrap-key")
        pushed = _push_tiny(settings, tmp_path, "tiny-ft-refused")
        producer = make_producer(settings.kafka)  # the watcher's verdict on it
        publish(producer, settings.kafka.topic(DEPLOYMENTS.name), "vlm", DeploymentEvent(
            status="refused", version=pushed.version, previous_version="base:tiny",
            reason="reranked mAP 0.1000 is below the prefilter alone (0.5000)",
            candidate={"gate/mAP": 0.1, "gate/rank1": 0.2},
            serving={"gate/mAP": 0.5, "gate/rank1": 0.6})).get(timeout=30)
        producer.close()

        with pytest.raises(ApiError) as gated:
            client.call("POST", "/v1/ops/rollout", {"model": pushed.version})
        assert (gated.value.status, gated.value.error) == (409, "gate.refused")
        assert "mAP 0.1000" in str(gated.value) and "mAP 0.5000" in str(gated.value)
        with pytest.raises(ApiError) as no_reason:
            client.call("POST", "/v1/ops/rollout", {"model": pushed.version, "force": True})
        assert (no_reason.value.status, no_reason.value.error) == (422, "query.invalid")
        assert "force needs a reason" in str(no_reason.value)
        with pytest.raises(ApiError) as unknown:
            client.call("POST", "/v1/ops/rollout", {"model": "nope", "kind": "embedder",
                                                    "force": True, "reason": "test"})
        assert (unknown.value.status, unknown.value.error) == (422, "checkpoint.unknown")

        client.call("POST", "/v1/ops/rollout", {"model": pushed.version, "force": True,
                                                "reason": "site acceptance"})
        events = read_events(settings, CHECKPOINTS, CheckpointEvent, 2)
        forced = [e for e in events if e.forced is not None]
        assert [e.version for e in forced] == [pushed.version]
        assert forced[0].forced.reason == "site acceptance"
        (entry,) = AuditLog(settings, ObjectStore(settings.s3)).export(
            action="checkpoint.force")
        assert (entry.target, entry.detail) == (f"vlm:{pushed.version}", "site acceptance")
        refusals = AuditLog(settings, ObjectStore(settings.s3)).export(action="ops.rollout")
        assert [(e.status, e.detail) for e in refusals] == [(409, "gate.refused")]
    finally:
        serve.shutdown()
        next(gen, None)


@pytest.mark.stack
def test_a_replica_that_does_not_reindex_follows_the_announced_verdict(settings,
                                                                       tmp_path) -> None:
    """The verdict is the reindexing replica's (here: announced by hand). The other replica
    never judges, never dual-writes before it is told, refuses when told, rolls a refused
    version when it is started later after all, and stops dual-writing when it is refused."""
    from chatreid.bus import make_producer, publish
    from chatreid.checkpoints import push
    from schemas import DEPLOYMENTS, DeploymentEvent

    from .test_embedder_training import Running, ingest, wait_for

    ingest(settings, 4, seed=21)
    follower = Running(settings, snapshots=False, reindex=False)
    producer = make_producer(settings.kafka)

    def announce(status: str, version: str) -> None:
        publish(producer, settings.kafka.topic(DEPLOYMENTS.name), "embedder", DeploymentEvent(
            model="embedder", status=status, version=version, reason=f"{status} by hand")
                ).get(timeout=30)

    try:
        service, rollout = follower.node.service, follower.node.rollout
        wait_for(lambda: service.stats.indexed >= 4)
        old = service.embedder.version
        worse = random_embedder()
        worse.save(tmp_path / "worse" / "embedder.pt")
        new = push(settings, tmp_path / "worse", model="embedder", stage="embedder",
                   version=worse.version).version
        time.sleep(3)  # sighted and loaded by now: it waits to be told, embedding as before
        assert service.versions == [old] and rollout.refused == [] and not rollout.busy

        announce("refused", new)
        wait_for(lambda: rollout.refused == [new])
        assert service.versions == [old]
        announce("started", new)  # the reindexing replica judged again (e.g. restarted)
        wait_for(lambda: service.versions == [old, new])
        announce("refused", new)  # ... and again: no report will come, stop dual-writing
        wait_for(lambda: service.versions == [old])
        assert rollout.refused == [new, new]
        ingest(settings, 2, seed=22)
        wait_for(lambda: service.stats.indexed >= 6)  # indexing went on throughout
    finally:
        producer.close()
        follower.stop()


@pytest.mark.stack
def test_the_demo_says_when_the_gate_refused_a_checkpoint(settings) -> None:
    from rich.console import Console

    from chatreid.app.demo import _gate_notes
    from chatreid.bus import make_producer, publish
    from schemas import DEPLOYMENTS, DeploymentEvent

    console = Console(record=True, width=300)
    _gate_notes(settings, console)
    assert console.export_text().strip() == ""  # nothing refused: nothing said
    producer = make_producer(settings.kafka)
    publish(producer, settings.kafka.topic(DEPLOYMENTS.name), "embedder", DeploymentEvent(
        model="embedder", status="refused", version="tuned-1", previous_version="imagenet-1",
        reason="validation mAP 0.0340 is below the serving embedder imagenet-1's 0.1020",
        candidate={"gate/mAP": 0.034}, serving={"gate/mAP": 0.102})).get(timeout=30)
    producer.close()
    _gate_notes(settings, console)
    text = console.export_text()
    assert "The rollout gate refused embedder checkpoint tuned-1 (gate mAP 0.034 vs 0.102)" in text
    assert "Still serving imagenet-1" in text and "chatreid force tuned-1 --model embedder" in text
