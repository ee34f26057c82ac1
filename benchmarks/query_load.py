"""Sustained image-query load against the retrieval app on Ray Serve: latency percentiles,
throughput and errors by status and code, for a fixed duration per mode.

Modes: ``prefilter`` asks with K = 1, so the shortlist is one candidate and the VLM runs no
forward pass (the best-choice dialogue needs two candidates; each answer's ``vlm_calls`` is
checked to be 0) - the API has no per-query switch to skip the rerank, and this costs what a
prefilter-only answer costs: embed (uploads) or look up the query, search FAISS, fetch one crop,
audit. ``rerank`` asks with K = 10 and the VLM (``--model``, default ``offline-default``: the
145M-parameter model served when no checkpoint exists) runs the whole dialogue.

Data: a synthetic site (the ingestor's synth source, seed 0) of ``--gallery`` crops streamed
through the real ingestor and embedding service into a fresh namespace (topics + bucket) of the
local stack; queries are RGB crops of that site by crop id (``--upload``: their bytes as
``image_b64``), in turn; no filters. Access control on (a bootstrap key), the per-key rate
limit raised above the offered load so that it measures the service, not the limiter.

    python benchmarks/query_load.py [--duration-s 120] [--modes prefilter rerank]
        [--concurrency 4] [--gallery 1000] [--model offline-default] [--upload]
        [--out benchmarks/results/query_load.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from common import build_site, header, write
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from chatreid.config import Settings

MODES = {"prefilter": 1, "rerank": 10}  # mode -> K


def namespace(port: int) -> Settings:
    s = Settings()
    tag = uuid.uuid4().hex[:8]
    s.kafka.topic_prefix, s.s3.bucket = f"load{tag}", f"load{tag}"
    s.embedder.group_id, s.index.snapshot_prefix = f"load{tag}", f"snap-load{tag}"
    s.ray.join_local_head = False  # never a developer's running head
    s.serve.app_name, s.serve.http_port = "load", port
    s.serve.api_key = "load-" + secrets.token_urlsafe(24)
    s.access.rate_per_minute = 1_000_000
    return s


class Load:
    """``concurrency`` closed-loop clients asking for ``duration_s``; every answer recorded as
    (start offset s, latency ms, status, code, vlm_calls)."""

    def __init__(self, url: str, api_key: str, bodies: list[bytes], concurrency: int,
                 duration_s: float, timeout_s: float) -> None:
        self.url, self.bodies = url.rstrip("/") + "/v1/query", bodies
        self.headers = {"content-type": "application/json",
                        "authorization": f"Bearer {api_key}"}
        self.concurrency, self.duration_s, self.timeout_s = concurrency, duration_s, timeout_s
        self.rows: list[tuple[float, float, int, str, int]] = []
        self._lock = threading.Lock()
        self._next = 0

    def _body(self) -> bytes:
        with self._lock:
            self._next += 1
            return self.bodies[self._next % len(self.bodies)]

    def one(self, t_start: float) -> tuple[float, float, int, str, int]:
        req = urllib.request.Request(self.url, data=self._body(), headers=self.headers,
                                     method="POST")
        t0 = time.perf_counter()
        calls = -1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                calls = int(json.loads(resp.read()).get("vlm_calls", -1))
                status, code = resp.status, "ok"
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                code = json.loads(raw).get("error", "?")
            except ValueError:
                code = "non-json"
            status = exc.code
        except TimeoutError:
            status, code = 0, "timeout"
        except OSError as exc:
            status, code = 0, type(exc).__name__
        return (t0 - t_start, (time.perf_counter() - t0) * 1000, status, code, calls)

    def run(self, desc: str) -> float:
        t_start = time.perf_counter()
        end = t_start + self.duration_s
        bar = tqdm(total=int(self.duration_s), desc=desc, unit="s")

        def client() -> None:
            while time.perf_counter() < end:
                row = self.one(t_start)
                with self._lock:
                    self.rows.append(row)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self.concurrency)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            bar.n = min(int(time.perf_counter() - t_start), int(self.duration_s))
            bar.set_postfix(answers=len(self.rows))
            bar.refresh()
        bar.close()
        return time.perf_counter() - t_start


def summarize(rows, wall_s: float, duration_s: float) -> dict:
    ok = [r[1] for r in rows if r[2] == 200]
    statuses = Counter(f"{r[2]} {r[3]}" for r in rows)
    out = {
        "answers": len(rows), "ok": len(ok), "wall_s": round(wall_s, 1),
        "throughput_qps": len(ok) / duration_s,
        "errors": {k: v for k, v in statuses.items() if not k.startswith("200 ")},
        "errors_total": len(rows) - len(ok),
        "vlm_calls_per_query": float(np.mean([r[4] for r in rows if r[2] == 200])) if ok else None,
    }
    if ok:
        out.update({f"p{q}_ms": float(np.percentile(ok, q)) for q in (50, 95, 99)})
        out.update(mean_ms=float(np.mean(ok)), max_ms=float(np.max(ok)))
        # stability: the p50 of each 30 s slice of the run
        slices: dict[int, list[float]] = {}
        for r in rows:
            if r[2] == 200:
                slices.setdefault(int(r[0] // 30), []).append(r[1])
        out["p50_ms_per_30s"] = [float(np.percentile(v, 50)) for _, v in sorted(slices.items())]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=120.0, help="per mode")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    p.add_argument("--gallery", type=int, default=1000)
    p.add_argument("--model", default="offline-default", help="the VLM of the rerank mode")
    p.add_argument("--upload", action="store_true", help="send image bytes, not crop ids")
    p.add_argument("--rerank-replicas", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=2, help="per rerank replica")
    p.add_argument("--port", type=int, default=8392)
    p.add_argument("--timeout-s", type=float, default=120.0, help="per query")
    p.add_argument("--log", type=Path, default=Path("out/bench/query_load.log"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/query_load.json"))
    args = p.parse_args()
    console = Console(width=140)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # replicas' logs stay in Ray's session folder, not on this console (read when ray imports)
    os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")
    from ray import serve

    from chatreid.cluster import connect
    from chatreid.query import ModelSpec
    from chatreid.storage import ObjectStore
    from services.retrieval.app import deploy

    settings = namespace(args.port)
    settings.serve.rerank_replicas = args.rerank_replicas
    settings.serve.torch_threads = args.torch_threads
    report = header("query_load", __doc__, args, model=args.model)
    report["modes"] = []
    try:
        site = build_site(settings, args.gallery, console)
        rgb = [(e, data) for e, data in site if e.modality == "rgb"]
        connect(settings)
        t0 = time.perf_counter()
        deploy(settings, ModelSpec.of_base(args.model))
        from chatreid.client import RetrievalClient

        client = RetrievalClient(settings.serve.base_url, timeout_s=600,
                                 api_key=settings.serve.api_key.get_secret_value())
        health = client.wait_ready(gallery=len(site), timeout_s=600)
        console.print(f"deployed {args.model} in {time.perf_counter() - t0:.0f}s; "
                      f"gallery {health['gallery']}")
        report["gallery"] = health["gallery"]
        report["access_control"] = health.get("access_control")
        for mode in args.modes:
            k = MODES[mode]
            bodies = []
            for event, data in rgb[:200]:
                q = ({"image_b64": base64.b64encode(data).decode()} if args.upload
                     else {"crop_id": event.crop_id})
                bodies.append(json.dumps({"kind": "standard", "k": k, "top": k, **q}).encode())
            load = Load(settings.serve.base_url, settings.serve.api_key.get_secret_value(), bodies,
                        args.concurrency, 10.0, args.timeout_s)
            load.run(f"{mode} warm-up")  # caches, allocator, first dialogue
            load = Load(settings.serve.base_url, settings.serve.api_key.get_secret_value(), bodies,
                        args.concurrency, args.duration_s, args.timeout_s)
            load_before = os.getloadavg()[0]
            wall = load.run(f"{mode} K={k}")
            row = {"mode": mode, "k": k, "concurrency": args.concurrency,
                   "model": args.model if mode == "rerank" else None,
                   "duration_s": args.duration_s,
                   # the machine is shared: its 1-minute load average around the run
                   "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                   **summarize(load.rows, wall, args.duration_s)}
            report["modes"].append(row)
            logging.info("mode %s: %s", mode, row)
    finally:
        serve.shutdown()
        ObjectStore(settings.s3).drop_bucket()
    show(report, console)
    write(args.out, report, console)


def show(report: dict, console: Console) -> None:
    t = Table("mode", "K", "clients", "answers", "ok/s", "p50 ms", "p95 ms", "p99 ms",
              "VLM calls", "errors", title=f"sustained image-query load, gallery "
              f"{report.get('gallery')}, access control {report.get('access_control')}")
    for r in report["modes"]:
        t.add_row(r["mode"], str(r["k"]), str(r["concurrency"]), str(r["answers"]),
                  f"{r['throughput_qps']:.2f}", f"{r.get('p50_ms', float('nan')):.0f}",
                  f"{r.get('p95_ms', float('nan')):.0f}", f"{r.get('p99_ms', float('nan')):.0f}",
                  f"{r['vlm_calls_per_query']}", json.dumps(r["errors"]) or "0")
    console.print(t)


if __name__ == "__main__":
    main()
