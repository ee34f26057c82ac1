"""Best-choice rerank latency: the plain path, prefix reuse, batched groups, a warm vision cache.

For each model and gallery size K, the same queries are reranked by ``BestChoiceReranker``
(full dialogue: until the pool is empty) on four paths, side by side in one run:

* ``plain``: one full forward per group (the reference);
* ``reuse``: the query prefix prefilled once, each crop through the ViT once per query, a
  re-asked group continuing its previous forward's cache; one forward per group;
* ``batched``: ``reuse``, with the groups a turn can ask together in one packed forward;
* ``cached``: ``batched`` with a warm vision cache (``VisionCache``: every candidate's ViT output
  computed by an earlier query, as for a gallery that earlier queries saw).

Every path must choose the same candidates as the plain one with the same probabilities
(checked, max difference recorded). Reported per path: latency p50/p95 per query, decoder
forwards, decoder tokens and ViT images per query; and each path's p50 speed-up over the plain
one. Beside them, each model's decoder cost on this machine (a fixed part per forward and a part
per token), which tells what a path's forwards and tokens cost at least.

Data: the synthetic world's Market-1501 layout (``--world``, default data/synth; a tiny one is
generated in a temporary folder when missing): each query is a query crop, its candidates its
identity's gallery crops plus other gallery crops up to K, in a seeded shuffle (the prefilter's
order does not change the cost). Crops are 128×64 (10 image tokens each).

    python benchmarks/rerank_prefix.py [--models tiny offline-default] [--ks 10 20 50]
        [--queries 5] [--group-size 8] [--threads 2] [--out benchmarks/results/rerank_prefix.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from common import header, write
from PIL import Image
from rich.console import Console
from rich.table import Table

from chatreid.data.datasets import Market1501
from chatreid.model import build_model
from chatreid.model.vision_cache import VisionCache
from chatreid.rerank import BestChoiceReranker, Candidate, Query, RerankResult

PATHS = ("plain", "reuse", "batched", "cached")


def load_world(path: Path) -> Market1501:
    if (path / "market1501").is_dir():
        return Market1501(path)
    from chatreid.synth import SynthConfig, generate_world

    root = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    generate_world(root, SynthConfig.tiny(), progress=False)
    return Market1501(root)


def workload(market: Market1501, k: int, n_queries: int, seed: int) -> list[tuple]:
    """(query crop, K candidates holding the query's gallery matches first drawn, then others)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(market.query), size=min(n_queries, len(market.query)), replace=False)
    out = []
    for qi in picks:
        q = market.query[int(qi)]
        same = [r for r in market.gallery if r.pid == q.pid][:k]
        others = [r for r in market.gallery if r.pid != q.pid]
        chosen = same + [others[int(i)] for i in rng.permutation(len(others))[: k - len(same)]]
        assert len(chosen) == k, f"the gallery holds fewer than K={k} crops"
        chosen = [chosen[int(i)] for i in rng.permutation(len(chosen))]
        cands = [Candidate(r.path.name, Image.open(r.path).convert("RGB"), cache_key=r.path.name)
                 for r in chosen]
        out.append((Image.open(q.path).convert("RGB"), cands))
    return out


def rerankers(model, processor, group_size: int) -> dict[str, BestChoiceReranker]:
    """One reranker per path (the vision cache belongs to the ``cached`` one)."""
    def make(**kw) -> BestChoiceReranker:
        return BestChoiceReranker(model, processor, group_size=group_size, **kw)

    return {"plain": make(reuse_prefix=False), "reuse": make(batch_groups=False),
            "batched": make(), "cached": make(vision_cache=VisionCache(model))}


def run(reranker: BestChoiceReranker, work: list[tuple]) -> list[RerankResult]:
    return [reranker.rerank(Query("standard", image=image), cands) for image, cands in work]


def summarise(results: list[RerankResult]) -> dict:
    ms = np.array([r.stats.elapsed_s * 1000 for r in results])
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "forwards_per_query": float(np.mean([r.stats.forwards for r in results])),
        "group_forwards_per_query": float(np.mean([r.stats.group_forwards for r in results])),
        "vit_images_per_query": float(np.mean([r.stats.vision_images for r in results])),
        "vit_cached_per_query": float(np.mean([r.stats.vision_cached for r in results])),
        "groups_judged_per_query": float(np.mean([r.stats.groups_judged for r in results])),
        "turns_per_query": float(np.mean([r.stats.turns for r in results])),
        "decoder_tokens_per_query": float(np.mean([r.stats.decoder_tokens for r in results])),
    }


def agreement(a: list[RerankResult], b: list[RerankResult]) -> tuple[bool, float]:
    """Both paths chose the same candidates in every turn; largest probability difference."""
    pairs = list(zip(a, b, strict=True))
    same = all([t.chosen for t in x.turns] == [t.chosen for t in y.turns] for x, y in pairs)
    diff = max(
        abs(s.probability - t.probability)
        for x, y in pairs
        for s, t in zip(x.turns, y.turns, strict=False)
    )
    return same, diff


@torch.no_grad()
def cost_model(model, n: int = 256, reps: int = 5) -> dict:
    """What a decoder forward costs here: a fixed part (one token: mostly reading every weight
    once) and a part per token (n tokens, less the fixed part), median of ``reps``."""
    def median_ms(tokens: int) -> float:
        ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, tokens))
        model(input_ids=ids, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append((time.perf_counter() - t0) * 1000)
        return float(np.median(times))

    fixed, full = median_ms(1), median_ms(n)
    return {"forward_fixed_ms": fixed, "per_token_ms": (full - fixed) / (n - 1)}


def bench(model_name: str, args: argparse.Namespace, market: Market1501, console: Console) -> list:
    start = time.perf_counter()
    model, processor = build_model(model_name)
    console.log(f"{model_name}: built in {time.perf_counter() - start:.1f}s")
    cost = cost_model(model)
    console.log(f"{model_name}: a decoder forward costs {cost['forward_fixed_ms']:.1f} ms + "
                f"{cost['per_token_ms']:.2f} ms per token")
    paths = rerankers(model, processor, args.group_size)
    rows = []
    for k in args.ks:
        work = workload(market, k, args.queries, args.seed)
        for reranker in paths.values():
            run(reranker, work[:1])  # warm-up (allocator, tokenizer caches)
        run(paths["cached"], work)  # the vision cache now holds every candidate: warm
        # query by query, every path in turn: a load change on the machine hits all alike
        results: dict[str, list[RerankResult]] = {name: [] for name in paths}
        for item in work:
            for name, reranker in paths.items():
                results[name] += run(reranker, [item])
        row: dict = {"model": model_name, "k": k, "queries": len(work),
                     "group_size": args.group_size, "cost": cost}
        for name in PATHS:
            row[name] = summarise(results[name])
        for name in PATHS[1:]:
            same, diff = agreement(results[name], results["plain"])
            row[name].update(same_choices=same, max_probability_diff=diff,
                             speedup_p50=row["plain"]["p50_ms"] / row[name]["p50_ms"])
        row["same_choices"] = all(row[n]["same_choices"] for n in PATHS[1:])
        row["max_probability_diff"] = max(row[n]["max_probability_diff"] for n in PATHS[1:])
        row["speedup_p50"] = row["cached"]["speedup_p50"]
        gains = ", ".join(f"{n} {row[n]['speedup_p50']:.2f}x" for n in PATHS[1:])
        console.log(f"{model_name} K={k}: {gains}, same={row['same_choices']}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> Table:
    t = Table(title="best-choice rerank per query, p50 ms (speed-up over plain) - full dialogue")
    cols = ("model", "K", *PATHS, "forwards plain / reuse / batched", "decoder tokens plain / "
            "cached", "ViT imgs plain / reuse / cached", "same", "max |Δp|")
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        cells = [f"{r['plain']['p50_ms']:.0f}"] + [
            f"{r[n]['p50_ms']:.0f} ({r[n]['speedup_p50']:.2f}x)" for n in PATHS[1:]]
        fwd = " / ".join(f"{r[n]['forwards_per_query']:.0f}" for n in PATHS[:3])
        vit = " / ".join(f"{r[n]['vit_images_per_query']:.0f}" for n in ("plain", "reuse",
                                                                          "cached"))
        tokens = " / ".join(f"{r[n]['decoder_tokens_per_query']:.0f}" for n in ("plain",
                                                                                "cached"))
        t.add_row(r["model"], str(r["k"]), *cells, fwd, tokens, vit, str(r["same_choices"]),
                  f"{r['max_probability_diff']:.1e}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "offline-default"])
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--world", type=Path, default=Path("data/synth"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rerank_prefix.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console() if Console().is_terminal else Console(width=160)
    market = load_world(args.world)
    rows = [row for name in args.models for row in bench(name, args, market, console)]
    console.print(table(rows))
    report = header("rerank_prefix", __doc__, args, torch_threads=args.threads,
                    torch=torch.__version__, transformers=transformers.__version__,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    report["results"] = rows
    write(args.out, report, console)

if __name__ == "__main__":
    main()
