"""The paper's inference: a multi-turn best-choice dialogue over the prefiltered gallery.

Each turn the VLM sees the query and the candidates still in the pool and names the best one;
the probability it gives that choice is the turn's confidence; the chosen candidate leaves the
pool; repeat until the pool is empty or ``max_turns``.

A pool larger than ``group_size`` (the gallery sizes the model was tuned on, 3-8) is judged as
a bracket: the pool is split once, in prefilter order, into balanced groups of at most
``group_size``; the winners of up to ``group_size`` groups meet in a group of the next level,
and so on up to one final group. A group's judgement depends only on the query and the
candidates it shows, so after a turn only the groups that held the chosen candidate (its leaf
and that leaf's ancestors) change; every other group's result is reused as is — exactly what
re-asking it would return. A full rerank of K candidates therefore costs about
K / (group_size - 1) forwards for the first turn and at most one per bracket level for each
later turn: linear in K, where re-splitting the pool every turn would be quadratic.

Ranking and confidences. A turn's probability ``p_t`` (the probability the model gave its
choice in the forward that decided turn ``t``) is relative to the rivals it was shown, so it
tends to rise as the pool shrinks (the last candidate, alone, is chosen with certainty and no
forward); raw turn probabilities neither compare across turns nor sum to anything. The reported
confidence is the dialogue's stick-breaking share: turn ``t``'s pick gets

    c_t = p_t * prod_{s < t} (1 - p_s)

- the belief the model had left after doubting every earlier pick, times the share of it the
turn's pick won. The ``c_t`` sum to at most 1 over the reranked candidates and read as "the
share of the model's belief that this candidate is the query's person": a certain judge gives
its first pick about 1 and the rest about 0; an uncertain one spreads them; two dialogues that
differ in certainty report different numbers (the old non-increasing cap ``min(p_t, c_{t-1})``
flattened them). The reranked candidates are ranked by that confidence, ties by turn (earlier
first: a pick after a near-certain one gets about 0, and the dialogue's order then decides).
Within a group a tie in probability goes to the candidate shown first (better prefilter rank).
With the identity head's dialogue memory on (``IdentityConfig.memory``), each pick also enters
later turns' pointer term (``chatreid.model.identity.memory_pointer``), so after a pick every
group is judged again - on the decoder logits it already computed, with no new forward.
Candidates left when ``max_turns`` ends the dialogue follow in prefilter order, with no
confidence (the belief they share is ``1 - sum c_t``). A query kind the checkpoint's identity
head abstains on (``IdentityConfig.abstain``: its dialogue did not surely beat the prefilter's
order on held-out people) runs no dialogue: every candidate keeps its prefilter rank, not
reranked.

Batching. Before each decision the groups it needs whose rivals are already known are judged
together, in one packed forward (``BestChoiceJudge.prefetch``): the first turn's leaves at
once. In a dialogue that runs until the pool is empty and has no memory, a leaf group's next
question is known in advance - its members leave the pool only when its winner is picked, so
it will be asked again without that winner - and every leaf's next question runs in the same
forward as the group a turn waits on, so a turn costs about one forward instead of one per
bracket level. The answers are the same as asking group by group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from chatreid.model import ChatReIDProcessor
from chatreid.model.identity import IdentityVision
from chatreid.model.prompting import choice_tokens
from chatreid.model.vision_cache import VisionCache
from chatreid.rerank.judge import BestChoiceJudge, JudgeStats, Query, make_judge

DEFAULT_GROUP_SIZE = 8  # the largest gallery of stage-3 training (Stage3Config.gallery_size)


Judge = Callable[[Sequence[int]], np.ndarray]  # candidate indices shown -> P(choice = each)


class EmptyGalleryError(ValueError):
    """Nothing to rerank: the prefilter returned no candidates."""


@dataclass(frozen=True)
class Candidate:
    id: str
    image: Image.Image
    prefilter_score: float | None = None
    # the image's immutable identity (a content-addressed object key): its vision-tower output
    # is cached under it and reused by later queries; None: encoded afresh every query
    cache_key: str | None = None


@dataclass(frozen=True)
class Ranked:
    rank: int  # 1-based, final
    candidate_id: str
    prefilter_rank: int  # 1-based position in the prefilter's order
    prefilter_score: float | None
    reranked: bool
    confidence: float | None  # stick-breaking share c_t in [0, 1] (module doc); None = not reranked
    turn: int | None = None  # 0-based turn that chose it
    turn_probability: float | None = None  # P(choice) in the forward that decided the turn


@dataclass(frozen=True)
class TurnRecord:
    index: int
    shown: list[str]  # candidate ids in the deciding forward, in the order shown
    chosen: str
    probability: float


@dataclass(frozen=True)
class RerankStats:
    candidates: int
    turns: int
    forwards: int  # decoder forward passes: group judgements + the prefix prefill
    group_forwards: int  # decoder forwards that judged groups (a batched one counts once)
    groups_judged: int  # groups whose decoder logits were computed
    prefix_forwards: int
    vision_images: int  # images run through the ViT
    vision_cached: int  # candidate images whose ViT output came from the vision cache
    group_tokens: int  # candidate-list tokens the group judgements covered
    reused_tokens: int  # of those, taken from an earlier judgement's cache (prefix reuse)
    decoder_tokens: int  # tokens the decoder computed, every forward (the prefix's included)
    batched_groups: int  # group judgements that shared a forward with others
    reuse_prefix: bool
    elapsed_s: float


@dataclass(frozen=True)
class RerankResult:
    ranking: list[Ranked]
    turns: list[TurnRecord]
    stats: RerankStats


@dataclass
class _Outcome:
    winner: int
    probability: float
    shown: list[int]


@dataclass
class _Group:
    """A bracket node: entries are candidate indices (leaf) or groups of the level below."""

    entries: list[int | _Group]
    parent: _Group | None = None
    outcome: _Outcome | None = None
    dirty: bool = True


def _balanced(items: list, size: int) -> list[list]:
    """``items`` in order, cut into the fewest groups of at most ``size``, sizes within one."""
    parts = -(-len(items) // size)
    return [[items[i] for i in chunk] for chunk in np.array_split(np.arange(len(items)), parts)]


class _Bracket:
    def __init__(self, n: int, group_size: int) -> None:
        leaves = [_Group(list(c)) for c in _balanced(list(range(n)), group_size)]
        self.leaf_of = {i: g for g in leaves for i in g.entries}
        level: list[_Group] = leaves
        while len(level) > 1:
            level = [_Group(list(c)) for c in _balanced(level, group_size)]
            for g in level:
                for child in g.entries:
                    child.parent = g  # pyright: ignore[reportAttributeAccessIssue]  (above the leaves, entries are _Groups)
        self.root = level[0]
        self.pool = set(range(n))

    def invalidate(self) -> None:
        """Every group judged again at the next turn (the judge's pointer term changed)."""
        for leaf in self.leaf_of.values():
            node: _Group | None = leaf
            while node is not None:
                node.dirty = True
                node = node.parent

    def remove(self, i: int) -> None:
        self.pool.discard(i)
        node: _Group | None = self.leaf_of[i]
        while node is not None:
            node.dirty = True
            node = node.parent


class BestChoiceReranker:
    """Rerank prefilter candidates with the VLM's multi-turn best-choice dialogue.

    ``reuse_prefix`` (default on) encodes the query part of the prompt and every candidate
    crop once per query; off, each group is one plain full forward (the reference path).
    ``vision_cache``: the candidates' vision-tower outputs by ``Candidate.cache_key`` across
    queries (prefix path only; it must belong to ``model``'s encoder: checked here).
    ``batch_groups`` (default on): groups judged together run as one packed forward (module
    doc); off, one forward per group (same answers).
    """

    def __init__(
        self,
        model: Qwen2VLForConditionalGeneration,
        processor: ChatReIDProcessor,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        max_turns: int | None = None,
        reuse_prefix: bool = True,
        identity: IdentityVision | None = None,
        vision_cache: VisionCache | None = None,
        batch_groups: bool = True,
    ) -> None:
        if group_size < 2:
            raise ValueError("group_size must be at least 2: a choice needs two candidates")
        if max_turns is not None and max_turns < 1:
            raise ValueError("max_turns must be at least 1 (None: until the pool is empty)")
        self.model = model.eval()
        self.processor = processor
        # Fails here, not mid-query, if some index 1..group_size has no token of its own.
        self.tokens = choice_tokens(processor.tokenizer, group_size)
        self.group_size = group_size
        self.max_turns = max_turns
        self.reuse_prefix = reuse_prefix
        self.identity = identity  # the checkpoint's identity head: each turn's pointer term
        if vision_cache is not None:
            vision_cache.check(model)  # never another encoder's features
        self.vision_cache = vision_cache
        self.batch_groups = batch_groups

    def rerank(
        self,
        query: Query,
        candidates: Sequence[Candidate],
        *,
        max_turns: int | None = None,
        reuse_prefix: bool | None = None,
    ) -> RerankResult:
        """All ``candidates`` (prefilter order) ranked: reranked ones first, then the rest."""
        if max_turns is not None and max_turns < 1:
            raise ValueError("max_turns must be at least 1 (None: the reranker's default)")
        if not candidates:
            raise EmptyGalleryError("no candidates to rerank: the prefiltered gallery is empty")
        if len({c.id for c in candidates}) != len(candidates):
            raise ValueError("candidate ids must be unique")
        start = time.perf_counter()
        reuse = self.reuse_prefix if reuse_prefix is None else reuse_prefix
        if self.identity is not None and self.identity.abstains(query.kind.value):
            # the checkpoint's dialogue did not beat the prefilter on this kind's held-out people
            ranking = _rank(candidates, [])
            return RerankResult(ranking, [], _stats(JudgeStats(), len(candidates), 0, reuse,
                                                    start))
        judge = make_judge(
            self.model,
            self.processor,
            query,
            [c.image.convert("RGB") for c in candidates],
            self.tokens,
            reuse,
            self.identity,
            keys=[c.cache_key for c in candidates],
            vision=self.vision_cache,
        )
        turns = self._dialogue(judge, candidates, max_turns or self.max_turns)
        ranking = _rank(candidates, turns)
        stats = _stats(judge.stats, len(candidates), len(turns), reuse, start)
        return RerankResult(ranking, turns, stats)

    def _dialogue(
        self, judge: Judge, candidates: Sequence[Candidate], max_turns: int | None
    ) -> list[TurnRecord]:
        bracket = _Bracket(len(candidates), self.group_size)
        limit = len(candidates) if max_turns is None else min(max_turns, len(candidates))
        remembers = isinstance(judge, BestChoiceJudge) and judge.remembers
        # a leaf's next question is sure to be asked only when the dialogue drains the pool
        # and a pick changes no other group's answer
        ahead = limit == len(candidates) and not remembers
        turns: list[TurnRecord] = []
        for t in range(limit):
            if self.batch_groups and isinstance(judge, BestChoiceJudge):
                _prefetch(bracket, judge, ahead)
            outcome = _decide(bracket.root, bracket.pool, judge)
            assert outcome is not None  # the pool is not empty while t < len(candidates)
            ids = [candidates[i].id for i in outcome.shown]
            turns.append(TurnRecord(t, ids, candidates[outcome.winner].id, outcome.probability))
            bracket.remove(outcome.winner)
            if remembers:  # every group's answer may change: re-judged (no forward, cached)
                judge.remember(outcome.winner, outcome.probability)
                bracket.invalidate()
        return turns


def _decide(group: _Group, pool: set[int], judge: Judge) -> _Outcome | None:
    """The group's winner among the candidates still in the pool (judged once while clean)."""
    if not group.dirty:
        return group.outcome
    rivals: list[_Outcome] = []
    for entry in group.entries:
        if isinstance(entry, _Group):
            sub = _decide(entry, pool, judge)
            if sub is not None:
                rivals.append(sub)
        elif entry in pool:
            rivals.append(_Outcome(entry, 1.0, [entry]))
    if len(rivals) <= 1:
        # No choice to make: a lone rival passes up with the probability it already has.
        group.outcome = rivals[0] if rivals else None
    else:
        shown = [r.winner for r in rivals]
        probs = judge(shown)
        best = int(np.argmax(probs))  # first maximum: ties go to the better prefilter rank
        group.outcome = _Outcome(shown[best], float(probs[best]), shown)
    group.dirty = False
    return group.outcome


class _Unknown:
    """A group whose winner needs a judgement not computed yet."""


_UNKNOWN = _Unknown()


def _prefetch(bracket: _Bracket, judge: BestChoiceJudge, ahead: bool) -> None:
    """Judge, a batch per round, every group the next decision needs as soon as its rivals are
    known; with ``ahead``, each such batch also takes every leaf's next question (the leaf
    without its current winner) not computed yet."""
    while True:
        wanted: list[list[int]] = []
        _peek(bracket.root, bracket.pool, judge, wanted)
        if not wanted:
            return
        if ahead:  # rides along with a forward that runs anyway; never a forward of its own
            wanted += _leaf_next(bracket, judge)
        judge.prefetch(wanted)


def _peek(group: _Group, pool: set[int], judge: BestChoiceJudge,
          wanted: list[list[int]]) -> int | _Unknown | None:
    """What ``_decide`` would return as the group's winner, without deciding anything; a
    group whose rivals are known but whose judgement is not computed goes into ``wanted``."""
    if not group.dirty:
        return None if group.outcome is None else group.outcome.winner
    rivals: list[int] = []
    unknown = False
    for entry in group.entries:
        sub = _peek(entry, pool, judge, wanted) if isinstance(entry, _Group) else (
            entry if entry in pool else None)
        if isinstance(sub, _Unknown):
            unknown = True
        elif sub is not None:
            rivals.append(sub)
    if unknown:
        return _UNKNOWN
    if len(rivals) <= 1:
        return rivals[0] if rivals else None
    if not judge.judged(rivals):
        wanted.append(rivals)
        return _UNKNOWN
    return rivals[int(np.argmax(judge(rivals)))]


def _leaf_next(bracket: _Bracket, judge: BestChoiceJudge) -> list[list[int]]:
    """Each leaf's next question not computed yet: its members in the pool without the one it
    now picks (the only way its members leave the pool is that one being chosen)."""
    wanted = []
    for leaf in {id(g): g for g in bracket.leaf_of.values()}.values():
        members = [i for i in leaf.entries if isinstance(i, int) and i in bracket.pool]
        if len(members) < 3 or not judge.judged(members):
            continue  # with two left, the next question has one rival: no forward
        winner = members[int(np.argmax(judge(members)))]
        rest = [i for i in members if i != winner]
        if not judge.judged(rest):
            wanted.append(rest)
    return wanted


def stick_breaking(probabilities: Sequence[float]) -> list[float]:
    """``c_t = p_t * prod_{s<t} (1 - p_s)`` for the turn probabilities ``p_t`` in turn order:
    each pick's share of the model's belief; they sum to at most 1."""
    shares, left = [], 1.0
    for p in probabilities:
        p = min(max(float(p), 0.0), 1.0)
        shares.append(left * p)
        left *= 1.0 - p
    return shares


def _rank(candidates: Sequence[Candidate], turns: list[TurnRecord]) -> list[Ranked]:
    position = {c.id: i for i, c in enumerate(candidates)}
    confidences = stick_breaking([turn.probability for turn in turns])
    order = sorted(range(len(turns)), key=lambda t: (-confidences[t], t))
    ranked = []
    for t in order:
        c = candidates[position[turns[t].chosen]]
        ranked.append(
            Ranked(
                rank=len(ranked) + 1,
                candidate_id=c.id,
                prefilter_rank=position[c.id] + 1,
                prefilter_score=c.prefilter_score,
                reranked=True,
                confidence=confidences[t],
                turn=t,
                turn_probability=turns[t].probability,
            )
        )
    chosen = {t.chosen for t in turns}
    for i, c in enumerate(candidates):
        if c.id not in chosen:
            ranked.append(Ranked(len(ranked) + 1, c.id, i + 1, c.prefilter_score, False, None))
    return ranked


def _stats(js: JudgeStats, n: int, turns: int, reuse: bool, start: float) -> RerankStats:
    return RerankStats(
        candidates=n,
        turns=turns,
        forwards=js.forwards,
        group_forwards=js.group_forwards,
        groups_judged=js.groups_judged,
        prefix_forwards=js.prefix_forwards,
        vision_images=js.vision_images,
        vision_cached=js.vision_cached,
        group_tokens=js.group_tokens,
        reused_tokens=js.reused_tokens,
        decoder_tokens=js.decoder_tokens,
        batched_groups=js.batched_groups,
        reuse_prefix=reuse,
        elapsed_s=time.perf_counter() - start,
    )
