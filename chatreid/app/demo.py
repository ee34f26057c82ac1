"""The main job, end to end on the embedded default: local stack, a synthetic site streamed
through the ingestor and the embedding service, the retrieval app deployed on Ray Serve, then a
cross-camera query prefiltered and reranked by the VLM's best-choice dialogue, printed as a
table and drawn as a contact sheet."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from tqdm import tqdm

from chatreid.app.stack import LocalStack
from chatreid.client import RetrievalClient
from chatreid.config import Settings, reveal
from chatreid.prefilter.search import PrefilterSearch
from chatreid.viz import (
    Comparison,
    answer_sheet,
    compare_answers,
    comparison_summary,
    comparison_table,
)
from schemas import QueryRequest
from schemas.api import QueryFilters, QueryKind

DEMO_EPOCH = 1_795_737_600.0  # 2026-11-27T00:00:00Z, the site's simulated morning


def _start_embedder(settings: Settings) -> subprocess.Popen:
    """The embedding service as its own process, exactly as compose and Helm run it."""
    logs = settings.stack.data_dir.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / "embedder-demo.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", "chatreid", "embed", "--until-idle", "30"],
                            stdout=log, stderr=subprocess.STDOUT)


def run_demo(settings: Settings, crops: int, seed: int, k: int, top: int, out: Path,
             console: Console, on_stack_up: Callable[[LocalStack], None] | None = None) -> None:
    """The demo on ``settings``; access control stays on (a bootstrap key is generated when
    none is configured) unless ``access.insecure``. ``on_stack_up`` sees the started stack
    (the CLI shows a newly generated key once)."""
    from services.ingestor import Ingestor
    from services.ingestor.sources import synth_source

    stack = LocalStack(settings)
    with console.status("starting the local stack (Kafka-protocol broker, S3 store, Ray)"):
        stack.up(ray=True, api_key=not settings.access.insecure)
    if on_stack_up:
        on_stack_up(stack)
    embedder_proc = _start_embedder(settings)
    try:
        person_of: dict[str, str] = {}  # sha256 of the crop -> synthetic person id
        sightings: dict[str, list] = defaultdict(list)
        ingestor = Ingestor(settings, source="synth")
        # a fixed clock makes a re-run idempotent: same sightings, same crop ids, no duplicates
        stream = synth_source(seed, crops, None, start_time=DEMO_EPOCH)
        for crop in tqdm(stream, total=crops, desc="ingest", unit="crop"):
            result = ingestor.submit(crop)
            if result.event is not None:  # = result.ok
                person_of[result.event.sha256] = crop.labels["person_id"]
                sightings[crop.labels["person_id"]].append(result.event)
        ingestor.close()

        engine = PrefilterSearch(settings)
        wanted = {e.crop_id for events in sightings.values() for e in events}
        _wait_indexed(engine, wanted, embedder_proc)
        client = _deploy(settings, console)
        if settings.ray.address is None:
            console.print(f"[dim]replica and Serve logs (the per-request log under serve/): "
                          f"{stack.ray_temp / 'session_latest' / 'logs'}[/]")
        client.wait_ready(gallery=len(wanted), timeout_s=300)
        query, others = _pick_query(sightings)
        # the whole shortlist comes back (top >= k): each result carries its prefilter rank, so
        # the answer holds the prefilter's own order too; the first ``top`` of each are shown
        request = QueryRequest(kind=QueryKind.STANDARD, crop_id=query.crop_id, k=k,
                               top=max(top, k),
                               filters=QueryFilters(cameras=sorted(others), modality="rgb"))
        with console.status(f"asking the VLM about the top {k} of the prefilter"):
            response = client.query(request)
        truth = {r.crop_id: person_of.get(_sha(engine.lookup(r.crop_id).object_key))
                 == query.labels["person_id"] for r in response.results}
        console.print(f"query: crop {query.crop_id[:12]} from camera {query.camera} at "
                      f"{query.capture_time:%H:%M:%S}; searching cameras {sorted(others)}")
        report_answer(response, truth, top, console)
        _gate_notes(settings, console)
        shown = response.model_copy(update={"results": response.results[:top]})
        sheet = answer_sheet(engine.crop_image, engine.crop_image(query.crop_id), shown,
                             out / "results.png", truth)
        console.print(f"contact sheet: {sheet}   API: {settings.serve.base_url}/docs")
        _investigate(client, query, others, truth, k, top, console)
        console.print(f"investigator console: {settings.serve.base_url}/console/")
    finally:
        embedder_proc.terminate()
        embedder_proc.wait(timeout=60)


def _deploy(settings: Settings, console: Console) -> RetrievalClient:
    """The retrieval app on the stack's Ray head (it outlives this command)."""
    from chatreid.cluster import connect
    from chatreid.query.vlm import resolve_spec
    from services.retrieval.app import deploy

    # the replicas' and proxies' lines stay in Ray's session logs, out of this terminal
    connect(settings, log_to_driver=False)
    spec = resolve_spec(settings)
    with console.status(f"deploying the retrieval app on Ray Serve (VLM "
                        f"{spec.version if spec else 'none'}: load + smoke query)"):
        deploy(settings, spec)
    return RetrievalClient(settings.serve.base_url, api_key=reveal(settings.serve.api_key))


def _investigate(client: RetrievalClient, query, others, truth: dict[str, bool], k: int,
                 top: int, console: Console) -> None:
    """The same search as a session: confirm the first correct hit, search again (the
    confirmed crop joins the query), show the timeline."""
    first = next((cid for cid, ok in truth.items() if ok), None)
    if first is None:
        return
    filters = {"cameras": sorted(others), "modality": "rgb"}
    sid = client.call("POST", "/v1/sessions", {"title": "demo", "filters": filters})["session_id"]
    client.call("POST", f"/v1/sessions/{sid}/search", {"crop_id": query.crop_id, "k": k,
                                                       "top": top})
    client.call("POST", f"/v1/sessions/{sid}/feedback", {"crop_id": first, "verdict": "confirm"})
    with console.status("session: searching again with the confirmed sighting in the query"):
        turn = client.call("POST", f"/v1/sessions/{sid}/search", {"k": k, "top": top})
    view = client.call("GET", f"/v1/sessions/{sid}")
    console.print(f"session {sid}: confirmed {first[:12]}; the next search ({turn['query_kind']},"
                  f" {len(turn['results'])} results) used it as the query image; timeline: "
                  + ", ".join(f"{s['camera']} {s['capture_time'][11:19]}"
                              for s in view["confirmed"]))


QUICK_TRAIN = "chatreid train --stage all --preset quick"
KEEPS_SERVING = "The app keeps serving: try `chatreid query --help`."


def report_answer(response, truth: dict[str, bool], top: int, console: Console) -> Comparison:
    """The prefilter's top beside the reranked top, a line scoring both, and - in yellow - a
    note whenever the rerank made the answer worse than the prefilter alone; then which model
    answered. ``response`` holds the whole shortlist (asked with top >= k)."""
    comparison = compare_answers(response, truth, top)
    console.print(comparison_table(comparison, response))
    console.print(comparison_summary(comparison))
    if comparison.worse and not response.prefilter_only:
        console.print(f"[yellow]{worse_note(comparison, response)}[/]")
        console.print(KEEPS_SERVING)
    else:
        console.print(_model_note(response))
    return comparison


def _served_by(response) -> str:
    version = response.model_version or ""
    if version.startswith("base:"):
        return f"the untuned base model {version[5:]}"
    return f"VLM checkpoint {version}"


def worse_note(c: Comparison, response) -> str:
    """Why this answer is worse than the prefilter's, which model gave it, how to get a better
    one."""
    ours, theirs = c.hits(c.reranked), c.hits(c.prefilter)
    if ours != theirs:
        how = (f"{ours}/{len(c.reranked)} of the person's crops in its top {c.top}, the "
               f"prefilter had {theirs}/{len(c.prefilter)}")
    else:
        first = c.first_hit(c.reranked)
        how = (f"its first correct hit is at {f'#{first}' if first else 'none'}, the "
               f"prefilter's at #{c.first_hit(c.prefilter)}")
    return (f"The VLM rerank made this answer worse than the prefilter alone ({how}). It was "
            f"served by {_served_by(response)}. For a better one, train a tuned checkpoint: "
            f"`{QUICK_TRAIN}`; the next `make demo` serves the newest, and a running "
            "`chatreid serve` rolls it out. Until then the prefilter's column is the better "
            "answer.")


def _model_note(response) -> str:
    version = response.model_version or ""
    if not version:
        return "No VLM served this answer: it is the prefilter's order."
    if response.prefilter_only:
        return (f"VLM checkpoint {version} abstains on {response.kind} queries (its dialogue "
                "did not beat the prefilter on held-out people): this is the prefilter's order.")
    if version.startswith("base:"):
        return (f"The VLM is the untuned base model ({version[5:]}): `{QUICK_TRAIN}` makes a "
                "tuned checkpoint; the next `make demo` serves it, and a running `chatreid "
                f"serve` rolls it out. {KEEPS_SERVING}")
    return f"VLM checkpoint {version}. {KEEPS_SERVING}"


def _gate_notes(settings: Settings, console: Console) -> None:
    """Say so when the rollout gate refused a checkpoint here: what serves is the model before
    it (the demo goes on with it), and how to override."""
    from chatreid.evaluation.gate import rollout_steps

    for kind in ("embedder", "vlm"):
        try:
            steps = rollout_steps(settings, kind)
        except Exception as exc:  # a note, never the demo's failure
            console.print(f"[yellow]rollout steps unavailable: {exc}[/]")
            return
        for step in steps.values():
            if step.status != "refused":
                continue
            ours, theirs = step.candidate.get("gate/mAP"), step.serving.get("gate/mAP")
            figures = (f" (gate mAP {ours:.3f} vs {theirs:.3f})"
                       if ours is not None and theirs is not None else "")
            console.print(f"[yellow]The rollout gate refused {kind} checkpoint {step.version}"
                          f"{figures}: {step.reason}. Still serving "
                          f"{step.previous_version or 'the model before it'}; `chatreid force "
                          f"{step.version} --model {kind} --reason ...` overrides (audited).[/]")


def _sha(object_key: str) -> str:
    return object_key.rsplit("/", 1)[-1].split(".")[0]


def _wait_indexed(engine: PrefilterSearch, wanted: set[str], proc: subprocess.Popen,
                  timeout_s: float = 600) -> None:
    bar = tqdm(total=len(wanted), desc="searchable", unit="crop")
    deadline = time.monotonic() + timeout_s
    while True:
        engine.refresh()
        store = engine.index.store
        done = 0 if store is None else sum(store.get_meta(c) is not None for c in wanted)
        bar.update(done - bar.n)
        if done == len(wanted):
            break
        if proc.poll() is not None:
            raise RuntimeError("the embedding service exited early; see its log in "
                               ".chatreid/logs/embedder-demo.log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done}/{len(wanted)} crops searchable after {timeout_s}s")
        time.sleep(0.5)
    bar.close()


def _pick_query(sightings: dict[str, list]):
    """A person seen by the most RGB cameras; query with their first RGB crop and search the
    other RGB cameras (standard cross-camera Re-ID; infrared needs the trained model)."""
    def rgb(events):
        return [e for e in events if e.modality == "rgb"]

    person = max(sorted(sightings), key=lambda p: len({e.camera for e in rgb(sightings[p])}))
    query = rgb(sightings[person])[0]
    others = {e.camera for events in sightings.values() for e in rgb(events)} - {query.camera}
    return query, others
