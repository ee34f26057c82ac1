"""Cloth-changing retrieval by persistent body traits (``chatreid.model.traits``).

Trains the trait reader on the attribute labels of the synthetic world's train people (and of
``--extra-people`` more people in a world of their own, as a stage-3 job trains the identity
head's reader: ``TrainRecipe.trait_people``), then
scores the world's cloth-changing task (LTCC layout, ``ltcc_cc`` protocol: the query's person
in the query's clothes is junk) by:

* ``cosine`` of each embedder given (the offline default ImageNet MobileNetV2; the imported
  OSNet from ``../shared`` when present): what an identity embedding reads across clothes;
* ``trait reader``: the reader's trait agreement (``TraitReader.match``);
* ``recorded traits``: the same agreement computed from the world's recorded traits (one-hot),
  the upper bound of a perfect reader.

It also reports each trait's accuracy on the test people's crops against the majority value.

Data: the synthetic world (``train.world``, synthesised with the default recipe when missing)
and a world of extra people in the training cache; the imported OSNet from ``../shared`` when
present.

    python benchmarks/trait_reader.py [--extra-people 270] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import header, shared_dir, write
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from chatreid.config import Settings
from chatreid.data.datasets.ltcc import LTCC
from chatreid.data.instructions.samples import load_entries
from chatreid.embedder import load_embedder
from chatreid.metrics import Labels, rank_metrics
from chatreid.model.traits import (
    TRAITS,
    TraitReaderConfig,
    labelled_crops,
    train_trait_reader,
)
from chatreid.tuning.embedder_training import extra_world_config
from chatreid.tuning.identity import FIT_SPLITS, cached_world
from chatreid.tuning.presets import PRESETS
from ray_jobs.train import ensure_world, world_config

OUT = Path(__file__).parent / "results" / "trait_reader.json"
OSNET = shared_dir() / "weights" / "osnet_x0_25_msmt17.onnx"
DOC = __doc__ or ""
console = Console()


def figures(matrix: np.ndarray, query: Labels, gallery: Labels) -> dict[str, float]:
    m = rank_metrics(matrix, query, gallery, "ltcc_cc", similarity=True)
    return {"mAP": 100 * m.mAP, "rank1": 100 * m.rank(1), "rank10": 100 * m.rank(10),
            "queries": m.queries}


def test_traits(world: Path, records: list) -> list[dict[str, str]]:
    """Each record's traits as the world's attribute annotations state them."""
    notes = json.loads((world / "attributes" / "attributes.json").read_text())
    return [{t: str(notes[r.path.relative_to(world).as_posix()]["attributes"][t])
             for t in TRAITS} for r in records]


def one_hot(traits: list[dict[str, str]]) -> np.ndarray:
    """Recorded traits as the reader's columns (a perfect reader's output)."""
    return np.asarray([np.concatenate([np.eye(len(v))[v.index(p[t])] for t, v in TRAITS.items()])
                       for p in traits], dtype=np.float32)


def cosine(source: str | None, query: list[Path], gallery: list[Path]) -> np.ndarray:
    emb = load_embedder(source)

    def feats(paths: list[Path]) -> np.ndarray:
        out = []
        for start in range(0, len(paths), 64):
            out.append(emb.embed([Image.open(p).convert("RGB") for p in paths[start:start + 64]]))
        f = np.concatenate(out).astype(np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    return feats(query) @ feats(gallery).T


def main() -> None:
    ap = argparse.ArgumentParser(description=DOC.split("\n\n")[0])
    ap.add_argument("--extra-people", type=int, default=PRESETS["default"].trait_people or 0,
                    help="people of an extra world the reader also trains on (0: none)")
    ap.add_argument("--epochs", type=int, default=TraitReaderConfig().epochs)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    settings, recipe = Settings(), PRESETS["default"]
    world = ensure_world(settings, recipe, console)
    train = labelled_crops(load_entries(world), absolute=True)  # train and val people
    if args.extra_people:  # the world a stage-3 job's reader learns from (ray_jobs.hpt)
        extra = cached_world(settings.train.out_dir / "cache" / "worlds", extra_world_config(
            world_config(recipe), args.extra_people), "people")
        train += labelled_crops(load_entries(extra, FIT_SPLITS), absolute=True)
    ds = LTCC(world)  # its query and test folders: the test people
    query, gallery = ds.query, ds.gallery
    q_labels, g_labels = (Labels(np.array([r.pid for r in rs]), np.array([r.camid for r in rs]),
                                 np.array([r.clothes_id for r in rs]))
                          for rs in (query, gallery))

    config = TraitReaderConfig(epochs=args.epochs)
    bar = tqdm(total=config.epochs, desc="trait reader", unit="epoch")
    t0 = time.perf_counter()

    def progress(_epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    reader = train_trait_reader(train, Image.open, config, progress=progress)
    train_s = time.perf_counter() - t0
    bar.close()

    rq, rg = (reader.read([Image.open(r.path) for r in rs]) for rs in (query, gallery))
    truths = test_traits(world, query + gallery)
    read = reader.split(np.concatenate([rq, rg]))
    accuracy = {}
    for t, values in TRAITS.items():
        truth = np.array([values.index(p[t]) for p in truths])
        accuracy[t] = {"accuracy": 100 * float((read[t].argmax(1) == truth).mean()),
                       "majority": 100 * float(np.bincount(truth).max() / len(truth))}

    rows = {"cosine, ImageNet MobileNetV2 (offline default)":
            figures(cosine(None, [r.path for r in query], [r.path for r in gallery]),
                    q_labels, g_labels)}
    if OSNET.is_file():
        rows["cosine, OSNet (imported Re-ID model)"] = figures(
            cosine(str(OSNET), [r.path for r in query], [r.path for r in gallery]),
            q_labels, g_labels)
    rows["trait reader"] = figures(reader.match(rq, rg), q_labels, g_labels)
    rows["recorded traits (a perfect reader)"] = figures(
        reader.match(one_hot(truths[:len(query)]), one_hot(truths[len(query):])),
        q_labels, g_labels)

    report = header("trait_reader", DOC, args) | {
        "train": {"crops": len(train), "seconds": round(train_s, 1), "version": reader.version},
        "test": {"queries": len(query), "gallery": len(gallery)},
        "trait_accuracy": accuracy, "cloth_changing": rows}
    show(report)
    write(args.out, report, console)


def show(report: dict) -> None:
    table = Table("cloth-changing ranking", "mAP", "rank-1", "rank-10",
                  title=f"synthetic cloth-changing, {report['test']['queries']} queries")
    for name, f in report["cloth_changing"].items():
        table.add_row(name, f"{f['mAP']:.1f}", f"{f['rank1']:.1f}", f"{f['rank10']:.1f}")
    console.print(table)
    acc = Table("trait", "accuracy", "majority value", title="trait reader on the test people")
    for t, a in report["trait_accuracy"].items():
        acc.add_row(t, f"{a['accuracy']:.0f}%", f"{a['majority']:.0f}%")
    console.print(acc)


if __name__ == "__main__":
    main()
