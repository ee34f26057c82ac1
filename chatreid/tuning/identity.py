"""Training the VLM's identity head (``chatreid.model.identity``) on stage-3 best-choice groups.

Each stage-3 sample with a query image is one group: the query, its gallery (3-8 crops, exactly
one of the query's person) and the answer. The head is trained listwise — cross-entropy of the
answer under ``softmax(decoder logits + s(q, c))`` over the group, the very distribution a
dialogue turn answers with (the decoder's logits computed once per group, ``with_decoder``) —
on cached backbone features, so an epoch over a thousand groups takes
well under a second and the head can see every group many times. The state with the best
held-out accuracy (identities the training never saw) is kept.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from chatreid.data.instructions import InstructionSample
from chatreid.data.instructions.samples import ImageEntry, layout_pool
from chatreid.data.instructions.stage3 import Stage3Config, build_stage3
from chatreid.data.worlds import relativize
from chatreid.embedder.colour import ColourAttributeMatcher
from chatreid.model.identity import (
    BETWEEN_KIND,
    CLUE_KINDS,
    IMAGE_KINDS,
    FeatureCache,
    IdentityConfig,
    IdentityHead,
    memory_pointer,
)
from chatreid.model.traits import TraitReader
from chatreid.rerank.prompts import QueryKind
from chatreid.synth import SynthConfig, generate_world

if TYPE_CHECKING:
    from chatreid.evaluation import EvalConfig


@dataclass(frozen=True)
class Group:
    task: str  # the stage-3 task (a query kind)
    query: str  # image key
    candidates: tuple[str, ...]
    answer: int  # 0-based position of the query's person among the candidates
    pid: int | str | None = None  # the query's person (validation splits by person)
    prior: tuple[float, ...] | None = None  # the decoder's index log-probabilities, if known


def split_by_person(groups: Sequence[Group], share: float = 0.2, seed: int = 0
                    ) -> tuple[list[Group], list[Group]]:
    """(training, validation) groups: a seeded ``share`` of the query persons is held out, so
    the head's epoch is chosen on people it never trained on and never on test identities."""
    people = sorted({str(g.pid) for g in groups})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(people, max(1, round(share * len(people))), replace=False).tolist()) \
        if len(people) > 1 else set()
    return ([g for g in groups if str(g.pid) not in held],
            [g for g in groups if str(g.pid) in held])


@dataclass(frozen=True)
class HeadRecipe:
    epochs: int = 60
    lr: float = 1e-2
    weight_decay: float = 1e-2
    batch_size: int = 64
    seed: int = 0


def groups_of(samples: Sequence[InstructionSample]) -> list[Group]:
    """The image-query best-choice groups among stage-3 samples (text-only ones are skipped)."""
    out = []
    for s in samples:
        kind = QueryKind.parse(s.task).value
        if s.stage != 3 or kind not in IMAGE_KINDS or not s.meta.get("query_is_image", True):
            continue
        out.append(Group(kind, s.images[0], tuple(s.images[1:]), int(s.answer["choice"]) - 1,
                         s.meta.get("query", {}).get("pid")))
    return out


class _Batch:
    """Groups as padded tensors: features (B, n, d), mask, answer and kind indices."""

    def __init__(self, groups: Sequence[Group], feats: dict[str, np.ndarray],
                 head: IdentityHead) -> None:
        n = max(len(g.candidates) for g in groups)
        d = head.cfg.feature_dim
        self.q = torch.from_numpy(np.stack([feats[g.query] for g in groups]))
        c = np.zeros((len(groups), n, d), np.float32)
        mask = np.zeros((len(groups), n), bool)
        for i, g in enumerate(groups):
            c[i, :len(g.candidates)] = [feats[k] for k in g.candidates]
            mask[i, :len(g.candidates)] = True
        c[~mask] = 1.0  # any non-zero vector: padded slots are masked out of the softmax
        self.c, self.mask = torch.from_numpy(c), torch.from_numpy(mask)
        self.answer = torch.tensor([g.answer for g in groups])
        self.kind = torch.tensor([head.kind_index(g.task) for g in groups])
        prior = np.zeros((len(groups), n), np.float32)
        for i, g in enumerate(groups):
            if g.prior is not None:
                prior[i, :len(g.prior)] = g.prior
        self.prior = torch.from_numpy(prior)

    def logits(self, head: IdentityHead) -> torch.Tensor:
        """The turn's answer logits as served: the decoder's (when known) + the head's."""
        return (self.prior + head(self.q, self.c, self.kind)).masked_fill(~self.mask,
                                                                          float("-inf"))


def group_features(groups: Sequence[Group], cache: FeatureCache, backbone,
                   load: Callable[[str], Image.Image]) -> dict[str, np.ndarray]:
    keys = list(dict.fromkeys(k for g in groups for k in (g.query, *g.candidates)))
    return dict(zip(keys, cache.get(keys, load, backbone), strict=True))


def with_decoder(groups: Sequence[Group], samples: dict[str, InstructionSample],
                 prior: Callable[[InstructionSample], np.ndarray]) -> list[Group]:
    """``groups`` with the decoder's index log-probabilities (``prior(sample)``: one forward
    each), so the head learns how far to trust itself over the decoder."""
    out = []
    for g in tqdm(groups, desc="decoder answers", unit="group"):
        logp = np.log(np.clip(prior(samples[_key(g.query, g.candidates)]), 1e-12, 1))
        out.append(Group(g.task, g.query, g.candidates, g.answer, g.pid,
                         tuple(float(x) for x in logp)))
    return out


def sample_index(samples: Sequence[InstructionSample]) -> dict[str, InstructionSample]:
    """Stage-3 samples by their group key (query + candidates), for :func:`with_decoder`."""
    return {_key(s.images[0], s.images[1:]): s for s in samples}


def _key(query: str, candidates: Sequence[str]) -> str:
    return query + "|" + ",".join(candidates)


@torch.no_grad()
def head_accuracy(head: IdentityHead, groups: Sequence[Group],
                  feats: dict[str, np.ndarray]) -> dict[str, float]:
    """Best-choice rank-1 of the head alone, the plain cosine's, and chance — overall and per
    task."""
    if not groups:
        return {}
    batch = _Batch(groups, feats, head)
    picks = batch.logits(head).argmax(-1)
    decoder_picks = batch.prior.masked_fill(~batch.mask, float("-inf")).argmax(-1)
    has_prior = all(g.prior is not None for g in groups)
    q = torch.nn.functional.normalize(batch.q, dim=-1)[:, None, :]
    cos = (q * torch.nn.functional.normalize(batch.c, dim=-1)).sum(-1)
    cos_picks = cos.masked_fill(~batch.mask, float("-inf")).argmax(-1)
    hits, cos_hits, chance = defaultdict(list), defaultdict(list), defaultdict(list)
    dec_hits = defaultdict(list)
    for i, g in enumerate(groups):
        for task in ("all", g.task):
            hits[task].append(bool(picks[i] == g.answer))
            cos_hits[task].append(bool(cos_picks[i] == g.answer))
            dec_hits[task].append(bool(decoder_picks[i] == g.answer))
            chance[task].append(1.0 / len(g.candidates))
    out = {}
    for task in hits:
        suffix = "" if task == "all" else f"/{task}"
        out[f"rank1{suffix}"] = float(np.mean(hits[task]))
        out[f"cosine_rank1{suffix}"] = float(np.mean(cos_hits[task]))
        out[f"chance_rank1{suffix}"] = float(np.mean(chance[task]))
        if has_prior:
            out[f"decoder_rank1{suffix}"] = float(np.mean(dec_hits[task]))
    return out


def train_identity_head(groups: Sequence[Group], feats: dict[str, np.ndarray],
                        eval_groups: Sequence[Group], eval_feats: dict[str, np.ndarray],
                        encoder_version: str, recipe: HeadRecipe = HeadRecipe(),
                        progress: bool = True) -> IdentityHead:
    """A head trained listwise on ``groups``; the epoch with the best held-out rank-1 (ties: the
    earlier) is kept. Its config records training and held-out figures."""
    if not groups:
        raise ValueError("no image-query stage-3 groups to train the identity head on")
    dim = len(next(iter(feats.values())))
    head = IdentityHead(IdentityConfig(feature_dim=dim, encoder_version=encoder_version))
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed)
    start = head_accuracy(head, eval_groups, eval_feats).get("rank1", 0.0)
    best, best_state = start, {k: v.clone() for k, v in head.state_dict().items()}
    t0, seen = time.perf_counter(), 0
    for _ in tqdm(range(recipe.epochs), desc="identity head", unit="epoch", disable=not progress):
        head.train()
        order = rng.permutation(len(groups))
        for i in range(0, len(order), recipe.batch_size):
            batch = _Batch([groups[j] for j in order[i:i + recipe.batch_size]], feats, head)
            loss = torch.nn.functional.cross_entropy(batch.logits(head), batch.answer)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(batch.answer)
        head.eval()
        score = head_accuracy(head, eval_groups, eval_feats).get("rank1", 0.0)
        if score > best or not eval_groups:
            best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    figures = {f"eval/{k}": v for k, v in head_accuracy(head, eval_groups, eval_feats).items()}
    figures |= {f"train/{k}": v for k, v in head_accuracy(head, groups, feats).items()}
    figures |= {"groups": float(len(groups)), "eval_groups": float(len(eval_groups)),
                "groups_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                "eval/rank1_untrained": start}
    head.cfg.metrics = figures
    return head.eval()


# --- how far to trust the decoder ----------------------------------------------------------------

DECODER_GRID = (0.0, 0.25, 0.5, 1.0)  # decoder_weight candidates; the fit keeps the best


@torch.no_grad()
def fit_decoder_weight(head: IdentityHead, groups: Sequence[Group], feats: dict[str, np.ndarray],
                       grid: Sequence[float] = DECODER_GRID) -> tuple[float, dict[str, float]]:
    """The decoder logits' weight beside the head (``IdentityConfig.decoder_weight``) whose
    turn answers are best on held-out ``groups`` carrying the decoder's answers: the smallest
    mean negative log-likelihood of the right candidate (a decoder sure of wrong answers costs
    much, one that knows gains). Rank-1 is reported beside it. 1.0 when no group has them."""
    known = [g for g in groups if g.prior is not None]
    if not known:
        return 1.0, {}
    batch = _Batch(known, feats, head)
    s = head(batch.q, batch.c, batch.kind)
    nll, rank1 = {}, {}
    for w in grid:
        logits = (w * batch.prior + s).masked_fill(~batch.mask, float("-inf"))
        nll[w] = float(torch.nn.functional.cross_entropy(logits, batch.answer))
        rank1[w] = float((logits.argmax(-1) == batch.answer).float().mean())
    best = min(grid, key=lambda w: (round(nll[w], 6), -w))
    figures = {f"decoder_weight/nll@{w:g}": v for w, v in nll.items()}
    figures |= {f"decoder_weight/rank1@{w:g}": v for w, v in rank1.items()}
    return float(best), figures | {"decoder_weight/value": float(best),
                                   "decoder_weight/groups": float(len(known))}


# --- dialogue memory -------------------------------------------------------------------------

MEMORY_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)  # candidate weights; the fit keeps the best (ties: less)


@dataclass(frozen=True)
class Shortlist:
    """One held-out query's prefilter shortlist: what a dialogue reranks."""

    kind: str
    query: np.ndarray | None  # (d,) backbone feature; None: a text-only query
    candidates: np.ndarray  # (k, d), prefilter order
    relevant: np.ndarray  # (k,) bool: the query's person (as the task's protocol counts it)
    total: int  # the query's relevant items in the whole gallery (the AP denominator)
    match: np.ndarray | None = None  # (k,) the clue's colour match m(t, c); None: no clue
    traits: np.ndarray | None = None  # (k,) the trait agreement t(q, c); None: no trait reader
    source: str = ""  # where it was drawn (TRAINING_WORLD, FIT_WORLD): a kind must gain in each


def shortlists(kind: str, queries: Sequence[int], feats: np.ndarray, pids: np.ndarray,
               allowed: Sequence[np.ndarray], k: int = 10,
               served: EvalConfig | None = None,
               traits: tuple[TraitReader, np.ndarray] | None = None) -> list[Shortlist]:
    """A shortlist per query index ``queries[n]`` into ``feats``: the ``k`` items of
    ``allowed[n]`` (the indices the task's protocol lets it match: another camera, other
    clothes, the other modality) first in the prefilter's order - the cosine order, or the
    order ``served`` gives image queries (``EvalConfig.served(settings.serve)``: the
    k-reciprocal shortlist when a site serves it), so a head's dialogue settings are fitted
    on the shortlists it will rerank. With ``traits`` (a reader and its reads of every item)
    each shortlist carries the query's trait agreement with its candidates. Queries with no
    relevant item allowed are skipped."""
    from chatreid.evaluation.runner import k_reciprocal_shortlists

    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = []
    for i, gallery in zip(queries, allowed, strict=True):
        relevant = pids[gallery] == pids[i]
        if not relevant.any():
            continue
        dist = 1.0 - unit[gallery] @ unit[i]
        if served is not None and served.shortlist_order == "k_reciprocal":
            dist = k_reciprocal_shortlists(dist[None], unit[i][None], unit[gallery],
                                           pool=served.pool, k1=served.k1,
                                           lambda_value=served.lambda_value)[0]
        top = np.argsort(dist, kind="stable")[:k]
        agree = None if traits is None else \
            traits[0].match(traits[1][i:i + 1], traits[1][gallery[top]])[0]
        out.append(Shortlist(kind, feats[i], feats[gallery[top]], relevant[top],
                             int(relevant.sum()), traits=agree))
    return out


def dialogue_order(head: IdentityHead, item: Shortlist, memory: float, weight: float = 0.0
                   ) -> list[int]:
    """The head's own best-choice dialogue over one shortlist (one group, no decoder): each turn
    picks the most likely remaining candidate under the pointer term (the image term, plus
    ``weight`` times the clue's match, or for an image query the trait agreement) with
    ``memory`` - as ``IdentityVision.pointer_terms``."""
    cands = torch.from_numpy(np.asarray(item.candidates, np.float32))
    if item.query is not None:
        to_query, between = head.relations(torch.from_numpy(np.asarray(item.query, np.float32)),
                                           cands, item.kind)
    else:
        to_query, between = np.zeros(len(cands)), head.between(cands, BETWEEN_KIND)
    extra = item.match if item.match is not None else item.traits
    if weight and extra is not None:
        to_query = to_query + weight * extra
    left, picks = list(range(len(to_query))), []
    while left:
        s = memory_pointer(to_query, between, memory, picks)[left]
        p = np.exp(s - s.max())
        best = int(np.argmax(p))
        picks.append((left.pop(best), float(p[best] / p.sum())))
    return [i for i, _ in picks]


def average_precision(relevant_in_order: np.ndarray, total: int) -> float:
    """AP of a ranked list whose first entries are ``relevant_in_order`` (the rest of the
    gallery after them is the same whatever the order, so it cancels in a comparison)."""
    hits = np.cumsum(relevant_in_order)
    ranks = np.flatnonzero(relevant_in_order) + 1
    return float((hits[relevant_in_order] / ranks).sum() / max(total, 1))


def fit_memory(head: IdentityHead, lists: Sequence[Shortlist],
               grid: Sequence[float] = MEMORY_GRID) -> tuple[float, dict[str, float]]:
    """The dialogue-memory weight with the best mean AP on held-out shortlists (ties: the
    smaller: no memory unless it helps), and the figures behind the choice."""
    if not lists:
        return 0.0, {}
    scores = {m: float(np.mean([average_precision(s.relevant[dialogue_order(head, s, m)],
                                                  s.total) for s in lists]))
              for m in grid}
    best = max(grid, key=lambda m: (round(scores[m], 6), -m))
    figures = {f"memory/mAP@{m:g}": v for m, v in scores.items()}
    figures |= {"memory/weight": float(best), "memory/shortlists": float(len(lists))}
    return float(best), figures


CLUE_GRID = (0.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # clue weights tried (the head's scale is ~10-20)
# trait weights tried: t(q, c) sums six log-agreements, so one trait misread moves it by ~1-7
TRAIT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
GAIN_CONFIDENCE = 0.9  # how sure the held-out gain over the prefilter must be for a kind to rerank


@dataclass(frozen=True)
class KindFit:
    """What ``fit_kinds`` chose per query kind, and the figures behind it."""

    clue: dict[str, float]  # the clue term's weight (kinds with a text clue only)
    memory: dict[str, float]  # the kind's dialogue-memory weight
    abstain: list[str]  # kinds whose dialogue did not surely beat the prefilter's order
    figures: dict[str, float]
    plain: list[str] = field(default_factory=list)  # image kinds better on the plain cosine
    # than on their learned metric (``IdentityHead.make_plain``: the caller applies it)
    traits: dict[str, float] = field(default_factory=dict)  # the trait term's weight (image
    # kinds whose shortlists carry trait agreements)


def gain_lower_bound(gains: Sequence[float] | np.ndarray, confidence: float = GAIN_CONFIDENCE,
                     resamples: int = 2000, seed: int = 0) -> float:
    """A one-sided bootstrap lower bound of the mean of per-query ``gains``: above 0 means the
    gain is not a few lucky queries (held-out sets hold 20-30 of them)."""
    values = np.asarray(gains, np.float64)
    if not len(values):
        return 0.0
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


def _best(aps: np.ndarray, settings: Sequence[tuple[float, float, str]]) -> int:
    """Index of the setting (clue weight, memory, metric) with the best mean AP (ties: the
    learned metric, less memory, then the smaller weight)."""
    means = aps.mean(axis=1)
    return max(range(len(settings)),
               key=lambda i: (round(float(means[i]), 6), settings[i][2] == "learned",
                              -settings[i][1], -settings[i][0]))


def _cross_fitted(aps: np.ndarray, settings: Sequence[tuple[float, float, str]]) -> np.ndarray:
    """Per shortlist, the AP of the setting chosen on the *other* half of the shortlists (two
    folds, alternating): the best of several settings, scored on the queries that chose it,
    would look better than it is."""
    n = aps.shape[1]
    folds = np.arange(n) % 2
    out = np.empty(n)
    for fold in (0, 1):
        mine, other = folds == fold, folds != fold
        if not other.any():  # one shortlist: nothing to choose on but itself
            other = mine
        out[mine] = aps[_best(aps[:, other], settings), mine]
    return out


def fit_kinds(head: IdentityHead, lists: Sequence[Shortlist],
              clue_grid: Sequence[float] = CLUE_GRID,
              memory_grid: Sequence[float] = MEMORY_GRID,
              trait_grid: Sequence[float] = TRAIT_GRID) -> KindFit:
    """Per query kind, the dialogue settings with the best mean AP on its held-out shortlists:
    the memory weight; for a kind with a text clue (shortlists with ``match``) the clue weight
    too, for an image kind with trait agreements (``traits``) the trait weight; for an image
    kind whether its learned metric or the plain cosine the head started from
    (``IdentityHead.make_plain``: on few training groups a kind's metric can fit them and lose
    on new people) - ties: the learned metric, less memory, then the smaller weight (a
    text-only kind needs a clue weight above 0: without one a turn has nothing to go on). A
    kind whose best dialogue does not beat the prefilter's own order with ``GAIN_CONFIDENCE``
    (``gain_lower_bound`` of the per-query AP gain <= 0, each query's gain taken with the
    settings chosen on the other half of the queries) abstains: the reranker answers it in the
    prefilter's order rather than risk a worse one. Shortlists from several sources (``source``:
    the training world's held-out people, the fit world's) choose the settings together, and
    the bound must hold in each source (figures ``kind/<kind>/<source>/...``). Figures are
    ``kind/<kind>/...``; kinds without shortlists are left out (they run with the head's global
    ``memory``)."""
    clue, memory, abstain, plain, figures, traits = {}, {}, [], [], {}, {}
    for kind in dict.fromkeys(s.kind for s in lists):
        mine = [s for s in lists if s.kind == kind]
        has_clue = mine[0].match is not None
        heads = {"learned": head}
        if not has_clue and kind in head.cfg.kinds:
            heads["plain"] = copy.deepcopy(head)
            heads["plain"].make_plain(kind)
        has_traits = not has_clue and mine[0].traits is not None
        weights = [w for w in clue_grid if w > 0 or mine[0].query is not None] \
            if has_clue else list(trait_grid) if has_traits else [0.0]
        settings = [(w, m, h) for h in heads for w in weights for m in memory_grid]
        aps = np.array([[average_precision(s.relevant[dialogue_order(heads[h], s, m, w)],
                                           s.total) for s in mine] for w, m, h in settings])
        w, m, h = settings[_best(aps, settings)]
        prefilter = np.array([average_precision(s.relevant, s.total) for s in mine])
        gains = _cross_fitted(aps, settings) - prefilter
        sources = np.array([s.source for s in mine])
        bounds = {src: gain_lower_bound(gains[sources == src]) for src in dict.fromkeys(sources)}
        bound = min(bounds.values())  # the dialogue must surely gain wherever it was judged
        if len(bounds) > 1:
            chosen = aps[settings.index((w, m, h))]
            for src, b in bounds.items():
                at = sources == src
                figures |= {f"kind/{kind}/{src}/gain_lower_bound": b,
                            f"kind/{kind}/{src}/mAP": float(chosen[at].mean()),
                            f"kind/{kind}/{src}/prefilter_mAP": float(prefilter[at].mean()),
                            f"kind/{kind}/{src}/shortlists": float(at.sum())}
        memory[kind] = float(m)
        if has_clue:
            clue[kind] = float(w)
        elif has_traits:
            traits[kind] = float(w)
        if h == "plain":
            plain.append(kind)
        if bound <= 0:
            abstain.append(kind)
        figures |= {f"kind/{kind}/mAP@{w_:g},{m_:g}" + ("" if h_ == "learned" else ",plain"):
                    float(row.mean()) for (w_, m_, h_), row in zip(settings, aps, strict=True)}
        figures |= {f"kind/{kind}/weight": float(w), f"kind/{kind}/memory": float(m),
                    f"kind/{kind}/plain": float(h == "plain"),
                    f"kind/{kind}/shortlists": float(len(mine)),
                    f"kind/{kind}/prefilter_mAP": float(prefilter.mean()),
                    f"kind/{kind}/mAP": float(aps[settings.index((w, m, h))].mean()),
                    f"kind/{kind}/gain_lower_bound": bound,
                    f"kind/{kind}/abstain": float(bound <= 0)}
    return KindFit(clue, memory, abstain, figures, plain, traits)


# the world layout each clue task's stage-3 samples are drawn from (chatreid.data.instructions)
CLUE_LAYOUTS = {"text_to_image": "cuhk_pedes", "attribute": "cuhk_pedes", "multimodal": "ltcc"}


def held_out_clue_shortlists(samples: Sequence[InstructionSample], entries: Sequence[ImageEntry],
                             people: set[str], features: Callable[[list[str]], np.ndarray],
                             colours: Callable[[list[str]], np.ndarray], k: int = 10
                             ) -> list[Shortlist]:
    """Shortlists for the clue fit: each stage-3 sample with a clue (``meta["clue"]``) whose
    person is in ``people`` queries, with its clue (and its image, multimodal), the whole
    layout its task draws from in the training world (``entries``, as ``world_shortlists``),
    shortlisted by the prefilter's own rule - the colour match alone for text, its mean with
    the cosine for multimodal (``chatreid.evaluation.runner``). ``colours(keys)`` gives the
    crops' colour vectors (``ColourAttributeMatcher.embed_images``)."""
    matcher, out = ColourAttributeMatcher(), []
    for kind in CLUE_KINDS:
        mine = [s for s in samples if s.stage == 3 and s.meta.get("clue")
                and QueryKind.parse(s.task).value == kind
                and str(s.meta.get("query", {}).get("pid")) in people]
        keys, info, pids = _layout(entries, CLUE_LAYOUTS.get(kind, ""))
        if not mine or not keys:
            continue
        has_image = bool(mine[0].meta.get("query_is_image"))
        feats, vectors = features(keys), colours(keys)
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        for s in mine:
            q = s.meta["query"]
            match = matcher.match(matcher.embed_texts([s.meta["clue"]]), vectors)[0]
            query = features([s.images[0]])[0] if has_image else None
            dist = 1.0 - match
            if query is not None:
                dist = (dist + 1.0 - unit @ (query / np.linalg.norm(query))) / 2
            same = pids == str(q.get("pid"))
            # a text query may match any crop; an image query not itself, and as its protocol says
            allowed = np.array([j for j in range(len(keys)) if query is None or (
                keys[j] != s.images[0] and _PROTOCOL[kind](q, info[j], bool(same[j])))],
                dtype=np.int64)
            relevant = same[allowed]
            if not relevant.any():
                continue
            top = allowed[np.argsort(dist[allowed], kind="stable")[:k]]
            out.append(Shortlist(kind, query, feats[top], same[top], int(relevant.sum()),
                                 match[top]))
    return out


# the world layout each image task's stage-3 samples are drawn from (chatreid.data.instructions)
TASK_LAYOUTS = {"standard": "market1501", "cloth_changing": "ltcc",
                "visible_infrared": "sysu_mm01"}


def world_shortlists(entries: Sequence[ImageEntry], people: set[str],
                     features: Callable[[list[str]], np.ndarray], k: int = 10,
                     max_queries: int | None = None,
                     served: EvalConfig | None = None,
                     traits: tuple[TraitReader, Callable[[str], Image.Image]] | None = None
                     ) -> list[Shortlist]:
    """Shortlists for the per-kind fit as a site's prefilter makes them: per image task,
    every crop of its layout in the training world (``entries``: ``load_entries``, the train
    and val identities) forms the gallery, hard negatives and all, and each crop of one of
    ``people`` (held out of the head's training) queries it under the task's protocol (another
    camera, other clothes, the other modality), in the order ``served`` gives (see
    :func:`shortlists`). Galleries of only the stage-3 samples' own few
    crops put the person first almost always: no verdict could be read from them. At most
    ``max_queries`` per task, evenly spaced over the crops. With ``traits`` (a reader and the
    loader of the crops) the shortlists carry the trait agreements (:func:`shortlists`)."""
    out = []
    for kind, layout in TASK_LAYOUTS.items():
        keys, info, pids = _layout(entries, layout)
        if not keys:
            continue
        rule = _PROTOCOL[kind]
        queries = _spaced([i for i in range(len(keys)) if pids[i] in people], max_queries)
        allowed = [np.array([j for j in range(len(keys))
                             if j != i and rule(info[i], info[j], pids[i] == pids[j])],
                            dtype=np.int64) for i in queries]
        reads = None if traits is None else \
            (traits[0], traits[0].read([traits[1](key) for key in keys]))
        out += shortlists(kind, queries, features(keys), pids, allowed, k, served, reads)
    return out


def _spaced(items: list[int], at_most: int | None) -> list[int]:
    if at_most is None or len(items) <= at_most:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, at_most).round().astype(int)]


def _layout(entries: Sequence[ImageEntry], layout: str
            ) -> tuple[list[str], list[dict], np.ndarray]:
    """One world layout's crops: their keys, what the protocols read (camera, clothes,
    modality) and their person ids."""
    pool = layout_pool(entries, layout)
    info = [{"camid": e.camid, "clothes_id": e.clothes_id, "modality": e.modality} for e in pool]
    return [e.relpath for e in pool], info, np.array([str(e.pid) for e in pool])


# what a query may be matched with: (query info, gallery info, same person) -> allowed
_PROTOCOL: dict[str, Callable[[dict, dict, bool], bool]] = {
    "standard": lambda q, g, same: not (same and q.get("camid") == g.get("camid")),
    "multimodal": lambda q, g, same: not (same and q.get("camid") == g.get("camid")),
    "cloth_changing": lambda q, g, same: not (same and q.get("clothes_id") == g.get("clothes_id")),
    "visible_infrared": lambda q, g, same: q.get("modality") != g.get("modality"),
}


# -- where the fit is judged: people and cameras the prefilter never saw ---------------------------
# The training world's people are the prefilter's own training identities (its Market-1501 train
# folder holds the train and val splits): on them it ranks far better than on new people (82 vs
# 50 mAP), so settings chosen and judged there do not carry over. A second world from the same
# recipe with another seed has new people and cameras; its every split is fit data.
TRAINING_WORLD, FIT_WORLD = "training_world", "fit_world"  # ``Shortlist.source``
FIT_SEED_OFFSET = 1_000_003_000  # far from the seeds anyone picks for a world of their own
FIT_SPLITS = ("train", "val", "test")
FIT_CLUE_MIX = {"text_to_image": 1.0, "attribute_query": 1.0, "multimodal": 1.0}


def fit_world_config(training: SynthConfig) -> SynthConfig:
    """The fit world's recipe: the training world's, with a seed no training world uses."""
    return training.model_copy(update={"seed": training.seed + FIT_SEED_OFFSET})


def fit_world(cache: Path, training: SynthConfig) -> Path:
    """The fit world of ``training``'s recipe under ``cache``, generated once (deterministic by
    seed; ~15 s for the small world) and reused by every later fit."""
    return cached_world(cache, fit_world_config(training), "fit")


def cached_world(cache: Path, config: SynthConfig, name: str) -> Path:
    """The world ``config`` describes under ``cache`` (``<name>-<digest of the config>``),
    generated once and reused."""
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
    root = Path(cache) / f"{name}-{digest}"
    if not (root / "manifest.json").is_file():  # written last: a cut run generates again
        generate_world(root, config, progress=False)
    return root


def fit_world_clue_samples(root: Path, seed: int, n: int = 360) -> list[InstructionSample]:
    """Stage-3 samples of the clue tasks only (text, attribute, multimodal) over every split of
    the fit world, images named world-relative as in a dataset: each is one clue query for
    ``held_out_clue_shortlists``."""
    built = build_stage3(root, seed=seed, n=n, splits=FIT_SPLITS,
                         config=Stage3Config(mix=dict(FIT_CLUE_MIX)))
    return [s.model_copy(update={"images": [relativize(root, p) for p in s.images]})
            for s in built]
