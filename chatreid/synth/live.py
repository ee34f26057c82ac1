"""Live mode: the site played as cameras emitting crops over time.

People make trips along the camera route (camera index order, or its reverse); at each camera on
their route they produce a track of 1-4 crops. Trips start in fixed windows of simulated time and
are merged through a heap, so crops come out in capture-time order however long the stream runs.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from chatreid.synth.render import Renderer, encode_jpeg
from chatreid.synth.world import (
    TAG_LIVE,
    Sighting,
    Site,
    SynthConfig,
    TrackSpec,
    build_site,
    image_attributes,
    make_track,
)

WINDOW_S = 900.0  # trips start in windows of this much simulated time
TRAVEL_S = (15.0, 55.0)  # walking time between consecutive cameras on a route


@dataclass(frozen=True)
class LiveCrop:
    site: str
    camera: str
    modality: Literal["rgb", "infrared"]
    capture_time: float  # epoch seconds
    track_id: str
    bbox: tuple[int, int, int, int]  # x, y, w, h in the camera frame
    jpeg: bytes
    person_id: int
    clothes_id: int
    attributes: dict[str, object]


def _window_tracks(site: Site, window: int) -> list[Sighting]:
    """All crops of the trips starting in one window, in no particular order."""
    cfg = site.config
    rng = np.random.default_rng([cfg.seed, TAG_LIVE, window])
    n_people = len(site.identities)
    out: list[Sighting] = []
    for trip in range(int(rng.poisson(max(1.0, n_people / 6)))):
        ident = site.identities[int(rng.integers(n_people))]
        day = int(window * WINDOW_S // 86400)
        outfit = ident.outfits[(day + ident.pid) % len(ident.outfits)]  # one outfit per day
        reverse = bool(rng.random() < 0.5)
        route = ident.cameras[::-1] if reverse else ident.cameras
        t = window * WINDOW_S + float(rng.uniform(0, WINDOW_S))
        for cam in route:
            spec = TrackSpec(
                pid=ident.pid,
                clothes_id=outfit.clothes_id,
                camera=cam,
                day=day,
                t0=t,
                length=int(rng.integers(1, 5)),
                track_id=f"{cfg.site}-w{window:06d}-p{trip:03d}-{site.cameras[cam].name}",
                seed=(cfg.seed, TAG_LIVE, window, trip, cam),
                reverse=reverse,
            )
            out.extend(make_track(site, spec, first_index=0))
            t = out[-1].time_s + float(rng.uniform(*TRAVEL_S))
    return out


def _live_sightings(site: Site) -> Iterator[Sighting]:
    """Crops in capture-time order. Window w's crops all start at or after w * WINDOW_S, so
    everything earlier than that in the heap is safe to emit before generating window w."""
    heap: list[tuple[float, int, Sighting]] = []
    counter = 0
    window = 0
    while True:
        for s in _window_tracks(site, window):
            heapq.heappush(heap, (s.time_s, counter, s))
            counter += 1
        window += 1
        while heap and heap[0][0] < window * WINDOW_S:
            yield heapq.heappop(heap)[2]


def iter_live_crops(
    config: SynthConfig,
    *,
    start_time: float = 0.0,
    rate_hz: float | None = None,
    limit: int | None = None,
    skip_s: float = 0.0,
) -> Iterator[LiveCrop]:
    """Stream crops of the site of ``config``; deterministic by seed.

    ``capture_time`` is ``start_time`` plus simulated seconds. With ``rate_hz`` the stream is paced
    in wall-clock time (crop i is not emitted before i / rate_hz seconds); otherwise it runs as fast
    as rendering allows. ``limit`` stops after that many crops (default: endless). ``skip_s``
    starts the stream that many simulated seconds in (e.g. 86400: the next day, when people
    wear their next outfit); what comes before is not rendered.
    """
    site = build_site(config)
    renderer = Renderer(site)
    t_start = time.monotonic()
    sightings = (s for s in _live_sightings(site) if s.time_s >= skip_s)
    for i, s in enumerate(sightings):
        if limit is not None and i >= limit:
            return
        cam = site.cameras[s.camera]
        jpeg = encode_jpeg(renderer.render(s), config.jpeg_quality)
        if rate_hz:
            delay = t_start + i / rate_hz - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield LiveCrop(
            site=config.site,
            camera=cam.name,
            modality=cam.modality,
            capture_time=start_time + s.time_s,
            track_id=s.track_id,
            bbox=s.bbox,
            jpeg=jpeg,
            person_id=s.pid,
            clothes_id=s.clothes_id,
            attributes=image_attributes(site, s),
        )
