"""Text-query prefilter: a cold query over a window of recent crops, with the colour vectors the
index holds (computed at embed time) against reading every crop's image (the earlier path).

Both readers are fresh (empty caches) for each clue and see the same index, so the two columns
differ only in where the colour vectors come from; the rankings are compared for equality.

Data: a synthetic site (``chatreid synth`` world) streamed through the real ingestor and
embedding service into a fresh namespace of the local stack; fixed garment-colour clues.

    python benchmarks/text_prefilter.py [--gallery 1000] [--window 1000] [--k 20]
        [--out benchmarks/results/text_prefilter.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import build_site, header, namespace, write
from rich.console import Console
from rich.table import Table

from chatreid.config import Settings
from chatreid.prefilter.search import PrefilterSearch
from chatreid.storage import ObjectStore

CLUES = ("a person in a red top and blue trousers", "someone wearing a white shirt",
         "black jacket and grey trousers", "a woman in a yellow top and a black skirt",
         "upper clothing colour: green; lower clothing colour: blue")


def cold_query(settings: Settings, clue: str, args: argparse.Namespace,
               stored: bool) -> tuple[float, list]:
    reader = PrefilterSearch(settings, stored_colours=stored)
    reader.refresh()
    t0 = time.perf_counter()
    hits = reader.describe(clue, k=args.k, window=args.window)
    return (time.perf_counter() - t0) * 1e3, [(h.crop_id, h.score) for h in hits]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", type=int, default=1000)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/text_prefilter.json"))
    args = p.parse_args()
    console = Console()
    settings = namespace()
    report = header("text_prefilter", __doc__, args)
    rows = []
    try:
        build_site(settings, args.gallery, console)
        for clue in CLUES:
            stored_ms, stored = cold_query(settings, clue, args, stored=True)
            read_ms, read = cold_query(settings, clue, args, stored=False)
            rows.append({"clue": clue, "stored_ms": stored_ms, "image_read_ms": read_ms,
                         "same_ranking": stored == read})
            console.log(rows[-1])
    finally:
        ObjectStore(settings.s3).drop_bucket()
    report["queries"] = rows
    report["stored_p50_ms"] = float(np.median([r["stored_ms"] for r in rows]))
    report["image_read_p50_ms"] = float(np.median([r["image_read_ms"] for r in rows]))
    report["same_ranking"] = all(r["same_ranking"] for r in rows)
    table = Table("clue", "stored colours", "image read", "same ranking",
                  title=f"cold text query over {args.window} crops, k = {args.k}")
    for r in rows:
        table.add_row(r["clue"], f"{r['stored_ms']:.1f} ms", f"{r['image_read_ms']:.0f} ms",
                      "yes" if r["same_ranking"] else "NO")
    console.print(table)
    write(args.out, report, console)


if __name__ == "__main__":
    main()
