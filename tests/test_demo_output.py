"""What `make demo` prints, and what stays out of its terminal: the prefilter's top beside the
reranked top, a yellow note whenever the rerank made the answer worse, the model that served
it; replicas whose progress bars and Serve lines (the per-request log too) go to log files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from schemas import QueryResponse, ResultItem

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def answer(reranked_order: list[int], model: str = "base:offline-default",
           prefilter_only: bool = False) -> QueryResponse:
    """A 20-candidate answer holding the whole shortlist, in the reranked order given as the
    crops' prefilter ranks (crop ``c07`` is the prefilter's #7, cosine falling with rank)."""
    results = [
        ResultItem(rank=i + 1, crop_id=f"c{p:02d}" + "0" * 10, camera=f"cam{p % 3}",
                   modality="rgb", capture_time=T0 + timedelta(seconds=p),
                   prefilter_score=0.9 - p / 100, prefilter_rank=p,
                   confidence=None if prefilter_only else 0.8 - i / 100,
                   reranked=not prefilter_only)
        for i, p in enumerate(reranked_order)]
    return QueryResponse(query_id="q", kind="standard", results=results, candidates=20,
                         vlm_calls=0 if prefilter_only else 19, prefilter_only=prefilter_only,
                         model_version=None if prefilter_only else model,
                         embedder_version="e1", elapsed_ms=1234.0)


def truth_for(response: QueryResponse, person: set[int]) -> dict[str, bool]:
    """The synthetic ground truth: the query's person is at these prefilter ranks."""
    return {r.crop_id: r.prefilter_rank in person for r in response.results}


def printed(response: QueryResponse, truth: dict[str, bool], top: int = 10) -> tuple[str, str]:
    from chatreid.app.demo import report_answer

    console = Console(record=True, width=200, force_terminal=True, color_system="standard",
                      file=io.StringIO())
    report_answer(response, truth, top, console)
    return console.export_text(styles=False, clear=False), console.export_text(styles=True)


# The person at prefilter ranks 1, 2, 3 and 15; the untuned VLM pushes them down.
WORSE = [5, 6, 7, 8, 1, 9, 10, 11, 12, 13, 2, 3, 4, 14, 15, 16, 17, 18, 19, 20]
PERSON = {1, 2, 3, 15}


def test_the_prefilter_top_is_printed_beside_the_reranked_top() -> None:
    from chatreid.viz import compare_answers

    response = answer(WORSE)
    truth = truth_for(response, PERSON)
    comparison = compare_answers(response, truth, top=10)
    assert [r.prefilter_rank for r in comparison.prefilter] == list(range(1, 11))
    assert [r.prefilter_rank for r in comparison.reranked] == WORSE[:10]
    assert (comparison.hits(comparison.prefilter), comparison.hits(comparison.reranked)) == (3, 1)
    assert (comparison.first_hit(comparison.prefilter), comparison.first_hit(comparison.reranked)) \
        == (1, 5)
    assert comparison.relevant == 4
    # AP@10 over min(10, 4) attainable hits: 1/1 + 2/2 + 3/3 = 3 of 4; reranked 1/5 of 4
    assert comparison.average_precision(comparison.prefilter) == pytest.approx(0.75)
    assert comparison.average_precision(comparison.reranked) == pytest.approx(0.05)

    text, _ = printed(response, truth)
    rows = [line for line in text.splitlines() if line.strip().startswith(("│ 1 ", "│ 5 "))]
    # rank 1: the prefilter's #1 (the person) beside the reranked #1 (its #5, not the person)
    first = rows[0]
    assert first.index("c01") < first.index("c05")
    assert "0.890" in first and "0.800" in first and "#5" in first
    assert first.count("yes") == 1 and first.count("no") == 1
    # rank 5: the prefilter's #5 (not the person) beside the reranked #5 (its #1, the person)
    assert "#1 " in rows[1] and rows[1].index(" no ") < rows[1].index("yes")
    assert ("prefilter: 3/10 the query's person (first at #1, AP@10 0.75); VLM reranked: 1/10 "
            "the query's person (first at #5, AP@10 0.05)") in " ".join(text.split())


def test_a_reranked_answer_worse_than_the_prefilter_says_so_in_yellow() -> None:
    response = answer(WORSE)
    text, styled = printed(response, truth_for(response, PERSON))
    flat = " ".join(text.split())
    assert ("The VLM rerank made this answer worse than the prefilter alone (1/10 of the "
            "person's crops in its top 10, the prefilter had 3/10)") in flat
    assert "served by the untuned base model offline-default" in flat
    assert "`chatreid train --stage all --preset quick`" in flat
    assert "\x1b[33mThe VLM rerank made this answer worse" in styled  # yellow

    # as many hits, the first one later: worse too, and said with the positions
    later = [4, 1, 2, 3, *range(5, 21)]
    response = answer(later, model="20261127T080000-abc123")
    flat = " ".join(printed(response, truth_for(response, {1, 2}))[0].split())
    assert "its first correct hit is at #2, the prefilter's at #1" in flat
    assert "served by VLM checkpoint 20261127T080000-abc123" in flat


def test_an_answer_as_good_as_the_prefilter_gets_no_warning_and_names_its_model() -> None:
    better = [1, 15, 2, 3, *(p for p in range(4, 21) if p != 15)]
    response = answer(better)
    text, _ = printed(response, truth_for(response, PERSON))
    flat = " ".join(text.split())
    assert "worse than the prefilter" not in flat
    assert "VLM reranked: 4/10" in flat and "prefilter: 3/10" in flat
    # the untuned base: how to make a tuned checkpoint
    assert ("The VLM is the untuned base model (offline-default): `chatreid train --stage all "
            "--preset quick` makes a tuned checkpoint") in flat

    response = answer(list(range(1, 21)), prefilter_only=True)
    flat = " ".join(printed(response, truth_for(response, PERSON))[0].split())
    assert "worse than" not in flat and "No VLM served this answer" in flat
    assert "not reranked" in flat

    # a checkpoint that abstains on the kind: said so, and by which model
    response = answer(list(range(1, 21)), prefilter_only=True).model_copy(
        update={"model_version": "hpt3-abc"})
    flat = " ".join(printed(response, truth_for(response, PERSON))[0].split())
    assert "VLM checkpoint hpt3-abc abstains on standard queries" in flat
    assert "this is the prefilter's order" in flat and "worse than" not in flat


def test_an_answer_cut_short_of_the_prefilter_top_is_refused() -> None:
    """The prefilter's top is rebuilt from the answer only when the answer holds it all."""
    from chatreid.viz import compare_answers

    response = answer(WORSE)
    cut = response.model_copy(update={"results": response.results[:10]})
    with pytest.raises(ValueError, match="ask with top >= k"):
        compare_answers(cut, truth_for(cut, PERSON), top=10)


# -- what stays out of the terminal --------------------------------------------------------------
def test_local_replicas_log_to_files_with_progress_bars_off() -> None:
    """The local config (`chatreid serve`, the demo) gives every deployment of the app an
    environment in which Serve's lines, the access log included, go to the replica log files
    only and model-loading bars are off; the portable config (Helm) leaves pods as they are."""
    from ray.serve.schema import ServeDeploySchema

    from chatreid.config import Settings
    from chatreid.query import ModelSpec
    from services.retrieval.app import REPLICA_ENV, deploy_config

    local = deploy_config(Settings(), ModelSpec.of_base("tiny"))
    app = ServeDeploySchema.model_validate(local).applications[0]
    assert app.runtime_env == {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0",
                                            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                            "TQDM_DISABLE": "1"}}
    assert "runtime_env" not in deploy_config(Settings(), portable=True)["applications"][0]

    # ... and in such a process the libraries really are quiet
    probe = (
        "import json, tqdm.auto, transformers.utils.logging as hf\n"
        "from ray.serve._private import constants\n"
        "print(json.dumps({'serve_to_stderr': constants.RAY_SERVE_LOG_TO_STDERR,\n"
        "  'hf_bars': hf.is_progress_bar_enabled(),\n"
        "  'tqdm_bars': not tqdm.auto.tqdm(range(2), desc='GGUF').disable}))\n")
    env = {k: v for k, v in os.environ.items() if k not in REPLICA_ENV}
    run = subprocess.run([sys.executable, "-c", probe], env={**env, **REPLICA_ENV},
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "serve_to_stderr": False, "hf_bars": False, "tqdm_bars": False}
    assert "GGUF" not in run.stderr


_WORKER_PRINTS = """
import sys, time
from pathlib import Path
import ray
from chatreid.cluster import connect
from chatreid.config import Settings

s = Settings()
s.ray.address, s.ray.join_local_head, s.ray.num_cpus = None, False, 1
s.ray.temp_dir = Path(sys.argv[2])
connect(s, log_to_driver=sys.argv[1] == "1")

@ray.remote
def step():
    print("[stage 3] step 1/2 loss 0.5", flush=True)
    # what Ray Train's placement-group cleaner logs each second without the State API
    print("Failed to query Ray Train Controller actor state. State API may be temporarily "
          "unavailable. Continuing to monitor.", file=sys.stderr, flush=True)

ray.get(step.remote())
time.sleep(3)  # Ray's log monitor forwards within a second or so
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("forward", [True, False])
def test_worker_lines_reach_the_driver_only_when_asked(forward: bool) -> None:
    """`chatreid train` (default) shows its workers' ``[stage N] step`` lines, never Ray
    Train's once-a-second State API warning; the demo (log_to_driver=False) does not print
    its Serve replicas' lines."""
    temp = tempfile.mkdtemp(prefix="crr", dir="/tmp")  # Ray's sockets need a short path
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-c", _WORKER_PRINTS, "1" if forward else "0", temp],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("[stage 3] step 1/2 loss 0.5" in run.stdout + run.stderr) is forward
    assert "Failed to query Ray Train Controller" not in run.stdout + run.stderr
