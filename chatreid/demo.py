"""The main job, end to end on the embedded default: local stack, a synthetic site streamed
through the ingestor and the embedding service, then a cross-camera query answered from the
prefilter store, printed as a table and drawn as a contact sheet."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from tqdm import tqdm

from .config import Settings
from .prefilter import SearchFilter
from .search import PrefilterSearch
from .stack import LocalStack
from .viz import results_sheet, results_table

DEMO_EPOCH = 1_795_737_600.0  # 2026-11-27T00:00:00Z, the site's simulated morning


def _start_embedder(settings: Settings) -> subprocess.Popen:
    """The embedding service as its own process, exactly as compose and Helm run it."""
    logs = settings.stack.data_dir.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / "embedder-demo.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", "chatreid", "embed", "--until-idle", "30"],
                            stdout=log, stderr=subprocess.STDOUT)


def run_demo(settings: Settings, crops: int, seed: int, k: int, out: Path,
             console: Console) -> None:
    from .services.ingestor import Ingestor
    from .services.ingestor.sources import synth_source

    with console.status("starting the local stack (Kafka-protocol broker, S3 store)"):
        LocalStack(settings).up(ray=False)
    embedder_proc = _start_embedder(settings)
    try:
        person_of: dict[str, str] = {}  # sha256 of the crop -> synthetic person id
        sightings: dict[str, list] = defaultdict(list)
        ingestor = Ingestor(settings, source="synth")
        # a fixed clock makes a re-run idempotent: same sightings, same crop ids, no duplicates
        stream = synth_source(seed, crops, None, start_time=DEMO_EPOCH)
        for crop in tqdm(stream, total=crops, desc="ingest", unit="crop"):
            result = ingestor.submit(crop)
            if result.ok:
                person_of[result.event.sha256] = crop.labels["person_id"]
                sightings[crop.labels["person_id"]].append(result.event)
        ingestor.close()

        engine = PrefilterSearch(settings)
        wanted = {e.crop_id for events in sightings.values() for e in events}
        _wait_indexed(engine, wanted, embedder_proc)
        query, others = _pick_query(sightings)
        image = engine.crop_image(query.crop_id)
        filters = SearchFilter(cameras=frozenset(others), modality="rgb")
        results = engine.search(image, k=k, filters=filters, exclude={query.crop_id})
        truth = {r.crop_id: person_of.get(_sha(r.object_key)) == query.labels["person_id"]
                 for r in results}
        gallery = len(engine.follower.store)
        console.print(f"query: crop {query.crop_id[:12]} from camera {query.camera} at "
                      f"{query.capture_time:%H:%M:%S}; searching cameras {sorted(others)}")
        console.print(results_table(results, gallery,
                                    "PREFILTER results (embedder only; VLM rerank not deployed)",
                                    truth))
        hits = sum(truth.values())
        console.print(f"{hits}/{len(results)} of the top {k} are the query's person "
                      f"(ground truth from the synthetic site).")
        sheet = results_sheet(engine.crop_image, image, results, out / "results.png", truth)
        console.print(f"contact sheet: {sheet}")
    finally:
        embedder_proc.terminate()
        embedder_proc.wait(timeout=60)


def _sha(object_key: str) -> str:
    return object_key.rsplit("/", 1)[-1].split(".")[0]


def _wait_indexed(engine: PrefilterSearch, wanted: set[str], proc: subprocess.Popen,
                  timeout_s: float = 600) -> None:
    bar = tqdm(total=len(wanted), desc="searchable", unit="crop")
    deadline = time.monotonic() + timeout_s
    while True:
        engine.refresh()
        store = engine.follower.store
        done = sum(cid in store for cid in wanted) if store else 0
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
