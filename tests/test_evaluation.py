"""The paper's evaluation protocol end to end on the tiny synthetic world: embedder baseline,
ChatReID with the tiny VLM sharded over a Ray actor, resumable dialogues, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatreid.config import Settings
from chatreid.evaluation import SYNTHETIC, EvalConfig, RerankOutcome
from chatreid.evaluation.runner import evaluate_task, shortlist


@pytest.fixture(scope="module")
def embedder():
    from chatreid.embedder import build_embedder

    return build_embedder(None, height=128, width=64, batch_size=32)


def test_reranking_in_prefilter_order_reproduces_the_baseline(world, embedder) -> None:
    cfg = EvalConfig(k=5, max_queries=4)
    seen = []

    def same_order(jobs):
        seen.extend(jobs)
        return [RerankOutcome(j.key, tuple(range(len(j.candidates))), 1) for j in jobs]

    def reversed_order(jobs):
        return [RerankOutcome(j.key, tuple(reversed(range(len(j.candidates)))), 1)
                for j in jobs]

    task = SYNTHETIC["synth_standard"]
    same = evaluate_task(task, world, embedder.embed, same_order, cfg)
    assert same.chatreid.cmc == pytest.approx(same.baseline.cmc)
    assert same.chatreid.mAP == pytest.approx(same.baseline.mAP)
    assert same.queries == 4 and same.vlm_calls == 4
    assert all(len(j.candidates) == 5 and j.kind == "standard" for j in seen)
    flipped = evaluate_task(task, world, embedder.embed, reversed_order, cfg)
    assert flipped.chatreid.mAP != pytest.approx(same.baseline.mAP)  # the order is used


@pytest.mark.parametrize("name", ["synth_standard", "synth_cloth_changing"])
def test_no_reorder_of_the_shortlist_beats_its_ceiling(world, embedder, name) -> None:
    """The ceiling row is the best reorder of each shortlist: above every order a reranker
    could answer with, and met by the order that puts the query's person first."""
    cfg = EvalConfig(k=8, max_queries=6)
    people: dict[str, str] = {}

    def person(path: str) -> str:
        return path.rsplit("/", 1)[-1].split("_")[0]  # world crops are named pid_...

    def orders(pick):
        return lambda jobs: [RerankOutcome(j.key, pick(j), 1) for j in jobs]

    def best(j):
        same = [person(c) == person(j.query_path) for c in j.candidates]
        people[j.key] = person(j.query_path)
        return tuple(sorted(range(len(j.candidates)), key=lambda i: not same[i]))

    task = SYNTHETIC[name]
    runs = [evaluate_task(task, world, embedder.embed, orders(pick), cfg) for pick in (
        lambda j: tuple(range(len(j.candidates))),
        lambda j: tuple(reversed(range(len(j.candidates)))),
        lambda j: tuple(np.random.default_rng(0).permutation(len(j.candidates)).tolist()))]
    ceiling = runs[0].ceiling
    assert ceiling is not None
    assert all(r.ceiling is not None and r.ceiling.mAP == ceiling.mAP for r in runs)
    assert all(r.chatreid.mAP <= ceiling.mAP + 1e-9 for r in runs)
    assert ceiling.mAP >= runs[0].baseline.mAP
    oracle = evaluate_task(task, world, embedder.embed, orders(best), cfg)
    assert people and oracle.chatreid.mAP == pytest.approx(ceiling.mAP)


def test_a_k_reciprocal_shortlist_is_what_the_vlm_and_the_baseline_see(world, embedder) -> None:
    """serve.shortlist_order = "k_reciprocal" evaluated as served: each image query's cosine
    top ``pool`` re-ordered by k-reciprocal encoding; the VLM gets the new top K, the baseline
    row is the new order, and text-only tasks keep their colour order."""
    seen: dict[str, list] = {}

    def record(jobs):
        seen[cfg.shortlist_order] = [j.candidates for j in jobs]
        return [RerankOutcome(j.key, tuple(range(len(j.candidates))), 1) for j in jobs]

    task = SYNTHETIC["synth_standard"]
    results = {}
    for order in ("cosine", "k_reciprocal"):
        cfg = EvalConfig(k=8, max_queries=6, shortlist_order=order, pool=40)
        results[order] = evaluate_task(task, world, embedder.embed, record, cfg)
    assert seen["cosine"] != seen["k_reciprocal"]  # other candidates, or another order
    krec = results["k_reciprocal"]
    assert krec.baseline.mAP != pytest.approx(results["cosine"].baseline.mAP)
    assert krec.chatreid.mAP == pytest.approx(krec.baseline.mAP)  # the VLM got that order
    assert any("k-reciprocal encoding" in n for n in krec.notes)
    # the peer row is the transductive one, unchanged
    assert results["cosine"].peer.mAP == krec.peer.mAP  # pyright: ignore[reportOptionalMemberAccess]
    text = SYNTHETIC["synth_text_to_image"]
    base = [evaluate_task(text, world, embedder.embed, None,
                          EvalConfig(k=8, max_queries=6, shortlist_order=o)).baseline.mAP
            for o in ("cosine", "k_reciprocal")]
    assert base[0] == base[1]


def test_text_and_multimodal_queries_carry_their_clues(world, embedder) -> None:
    cfg = EvalConfig(k=3, max_queries=3)
    seen: dict[str, list] = {}

    def record(jobs):
        seen.setdefault(jobs[0].kind, []).extend(jobs)
        return [RerankOutcome(j.key, tuple(range(len(j.candidates))), 1) for j in jobs]

    for name in ("synth_text_to_image", "synth_attribute", "synth_multimodal"):
        result = evaluate_task(SYNTHETIC[name], world, embedder.embed, record, cfg)
        assert result.chatreid.mAP == pytest.approx(result.baseline.mAP)
    text, attribute, multimodal = seen["text_to_image"], seen["attribute"], seen["multimodal"]
    assert all(j.query_path is None and j.query_text for j in text + attribute)
    assert all("upper clothing colour: " in j.query_text for j in attribute)
    assert all(j.query_path and j.query_text for j in multimodal)  # image + the other outfit


def test_missing_annotations_name_the_file(tmp_path, world, embedder) -> None:
    import shutil

    from chatreid.data.datasets import DatasetLayoutError

    copy = tmp_path / "world"
    shutil.copytree(world / "cuhk_pedes", copy / "cuhk_pedes")
    with pytest.raises(DatasetLayoutError, match=r"attributes\.json"):
        evaluate_task(SYNTHETIC["synth_attribute"], copy, embedder.embed, None, EvalConfig())


def test_tau_shortens_the_shortlist() -> None:
    row = np.array([0.9, 0.1, 0.5, 0.3], dtype=np.float32)  # cosine 0.1, 0.9, 0.5, 0.7
    assert shortlist(row, EvalConfig(k=3)) == [1, 3, 2]
    assert shortlist(row, EvalConfig(k=3, tau=0.6)) == [1, 3]


def test_suite_on_ray_is_resumable_and_reported(world, embedder, ray_session, tmp_path) -> None:
    from chatreid.evaluation.report import write_report
    from chatreid.query import ModelSpec
    from ray_jobs.evaluate import run_evaluation

    settings = Settings()
    cfg = EvalConfig(k=4, max_queries=4)
    tasks = [SYNTHETIC[t] for t in ("synth_standard", "synth_visible_infrared",
                                    "synth_text_to_image", "synth_attribute", "synth_multimodal")]
    spec = ModelSpec.of_base("tiny")
    results = run_evaluation(settings, tasks, world, cfg, embedder=embedder, spec=spec,
                             out=tmp_path, workers=1)
    for r in results:  # every task family runs, text ones included
        assert r.chatreid is not None and r.vlm_calls > 0 and 0 < r.queries <= 4, r.task
        assert 0.0 <= r.chatreid.mAP <= 1.0
    assert any("colour-attribute" in n for n in results[2].notes)
    dialogues = next((tmp_path / "dialogues").glob("*.jsonl"))
    lines = dialogues.read_text().count("\n")
    assert lines == sum(r.queries for r in results)  # one per query dialogue
    again = run_evaluation(settings, tasks, world, cfg, embedder=embedder, spec=spec,
                           out=tmp_path, workers=1)
    assert dialogues.read_text().count("\n") == lines  # nothing reranked twice
    assert [r.chatreid.mAP for r in again] == [r.chatreid.mAP for r in results]

    report = write_report({"tiny": results}, cfg, tmp_path / "report", {"suite": "synthetic"})
    text_md = report.read_text()
    for title in ("Table 1 - standard Re-ID", "Table 3", "Table 5", "Attribute-based",
                  "Adaptive multi-modal"):
        assert title in text_md
    assert "n/a" not in text_md
    assert (tmp_path / "report" / "cmc_synth_standard.png").is_file()
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["models"]["tiny"][0]["chatreid"]["queries"] == 4


def _all_cpus_free(timeout_s: float = 60) -> float:
    """The session's Ray CPUs, once actors killed by earlier tests have released theirs."""
    import time

    import ray

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    return total


def test_eval_says_what_it_waits_for_and_fails_when_the_cluster_is_full(
        ray_session, tmp_path, capsys) -> None:
    """`chatreid eval` while a Serve app holds the head's CPUs used to wait forever at
    "VLM dialogues 0/30": now it says what it waits for and gives up after the bound."""
    import ray

    from chatreid.evaluation.runner import RerankJob
    from chatreid.query import ModelSpec
    from ray_jobs.evaluate import ClusterBusy, RayReranker

    @ray.remote
    class Hog:  # e.g. the demo's Serve replicas
        def ping(self) -> bool:
            return True

    total = _all_cpus_free()
    hog = Hog.options(num_cpus=total).remote()
    try:
        ray.get(hog.ping.remote(), timeout=60)  # the cluster's CPUs are held now
        settings = Settings()
        settings.ray.placement_timeout_s = 3.0
        reranker = RayReranker(settings, ModelSpec.of_base("tiny"), tmp_path, workers=1)
        job = RerankJob(key="q0", kind="standard", query_path=None, query_text="x",
                        candidates=("a.png",))
        with pytest.raises(ClusterBusy, match=r"any of 1 VLM actors needing 1 CPU each within "
                           r"3s: it has 0 of \d+ CPUs free"):
            reranker([job])
        assert "waiting for 1 of 1 VLM actors needing 1 CPU each; the cluster has 0 of" in \
            capsys.readouterr().err
    finally:
        ray.kill(hog)


def test_a_job_goes_on_with_the_actors_the_cluster_could_place(ray_session) -> None:
    import ray

    from ray_jobs.placement import place_actors

    @ray.remote
    class Worker:
        def placed(self) -> bool:
            return True

    total = _all_cpus_free()
    hog = Worker.options(num_cpus=total - 1).remote()
    said: list[str] = []
    try:
        ray.get(hog.placed.remote(), timeout=60)
        actors = [Worker.options(num_cpus=1).remote() for _ in range(2)]
        placed = place_actors(actors, 1, timeout_s=3, what="workers", say=said.append)
        assert len(placed) == 1 and ray.get(placed[0].placed.remote())
        assert said[0].startswith("waiting for 1 of 2 workers needing 1 CPU each")
        assert said[-1].startswith("going on with 1 of 2 workers")
        ray.kill(placed[0])
    finally:
        ray.kill(hog)


def test_a_training_job_says_what_it_waits_for_and_gives_up(ray_session, capsys) -> None:
    """Ray Train waits silently for workers it cannot place: the launcher reserves them first
    and fails with what was needed and what is free."""
    import ray

    from ray_jobs.launcher import run_trainer
    from ray_jobs.placement import ClusterBusy

    @ray.remote
    class Hog:
        def ping(self) -> bool:
            return True

    hog = Hog.options(num_cpus=_all_cpus_free()).remote()
    try:
        ray.get(hog.ping.remote(), timeout=60)
        settings = Settings()
        settings.ray.placement_timeout_s = 3.0
        with pytest.raises(ClusterBusy, match=r"2 Ray Train workers needing 1 CPU each"):
            run_trainer(settings, lambda config: None, {}, name="never-placed", num_workers=2)
        said = capsys.readouterr().err
        assert "waiting for 1 of 1 sets of 2 Ray Train workers needing 1 CPU each" in said
        assert not [g for g in ray.util.placement_group_table().values()
                    if g["state"] not in ("REMOVED",)]  # the reservation was released
    finally:
        ray.kill(hog)
