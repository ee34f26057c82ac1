"""Dialogue memory: a pick of the multi-turn dialogue counts as evidence of the person in later
turns (query expansion inside the dialogue), at no extra decoder forward, with its weight
fitted on held-out people and never switched on where it does not help."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.data.instructions.samples import IMAGE_TOKEN, ImageEntry, InstructionSample
from chatreid.model import build_model
from chatreid.model.identity import (
    INITIAL_SCALE,
    IdentityConfig,
    IdentityHead,
    IdentityVision,
    load_identity_head,
    memory_pointer,
    save_identity_head,
)
from chatreid.model.prompting import choice_tokens
from chatreid.rerank import BestChoiceReranker, Candidate, Query
from chatreid.rerank.judge import BestChoiceJudge, make_judge
from chatreid.tuning.identity import (
    FIT_WORLD,
    TRAINING_WORLD,
    Group,
    Shortlist,
    average_precision,
    fit_decoder_weight,
    fit_kinds,
    fit_memory,
    shortlists,
    world_shortlists,
)

# query Q; A: the person, close to Q; B: the person seen differently, far from Q but close to
# A; D1, D2: other people closer to Q than B is
FEATURES = {
    (250, 0, 0): [1.0, 0.0, 0.0],  # Q
    (0, 250, 0): [0.8, 0.6, 0.0],  # A
    (0, 0, 250): [0.3, 0.95, 0.0],  # B
    (250, 250, 0): [0.5, 0.0, 0.866],  # D1
    (0, 250, 250): [0.45, 0.0, 0.893],  # D2
}


class ColourBackbone:
    """A backbone whose feature of a crop is fixed by its colour (the relations under test)."""

    version = "colour-test"
    dim = 3

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return np.array([FEATURES[im.convert("RGB").getpixel((0, 0))] for im in images],
                        np.float32)


def crop(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (32, 64), rgb)


def identity(memory: float) -> IdentityVision:
    head = IdentityHead(IdentityConfig(feature_dim=3, encoder_version="colour-test",
                                       memory=memory))
    with torch.no_grad():
        head.log_scale.fill_(float(np.log(40.0)))  # the head outweighs the tiny decoder
    return IdentityVision(ColourBackbone(), head)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


def ranked_ids(tiny, memory: float) -> list[str]:
    model, processor = tiny
    colours = [(250, 250, 0), (0, 250, 250), (0, 0, 250), (0, 250, 0)]  # D1, D2, B, A
    cands = [Candidate(name, crop(c)) for name, c in zip(["D1", "D2", "B", "A"], colours,
                                                         strict=True)]
    reranker = BestChoiceReranker(model, processor, group_size=4, identity=identity(memory))
    result = reranker.rerank(Query("standard", image=crop((250, 0, 0))), cands)
    return [t.chosen for t in result.turns]


def test_a_pick_helps_find_the_persons_other_views(tiny) -> None:
    assert ranked_ids(tiny, 0.0) == ["A", "D1", "D2", "B"]  # B is far from the query itself
    assert ranked_ids(tiny, 2.0) == ["A", "B", "D1", "D2"]  # but close to A, found in turn 1


def test_memory_costs_no_extra_decoder_forward(tiny) -> None:
    """After a pick every group is judged again under the new pointer term, on the decoder
    logits it already has: one forward per distinct group shown, none repeated."""
    model, processor = tiny
    colours = [(250, 250, 0), (0, 250, 250), (0, 0, 250), (0, 250, 0)] * 3
    cands = [Candidate(str(i), crop(c)) for i, c in enumerate(colours)]
    query = Query("standard", image=crop((250, 0, 0)))
    judge = make_judge(model, processor, query, [c.image for c in cands],
                       choice_tokens(processor.tokenizer, 4), True, identity(1.0))
    assert judge.remembers
    turns = BestChoiceReranker(model, processor, group_size=4)._dialogue(judge, cands, None)
    assert len(turns) == len(judge.picks) == len(cands)
    assert judge.stats.groups_judged == len(judge._logits)


@pytest.mark.parametrize("memory", [0.0, 1.0])
def test_a_head_that_weighs_the_decoder_0_reranks_without_a_forward(tiny, memory,
                                                                    monkeypatch) -> None:
    """Skipping the decoder where its weight is 0 changes no answer: the same dialogue as
    computing every group's logits and weighing them 0, at no decoder forward or ViT pass."""
    model, processor = tiny
    colours = [(250, 250, 0), (0, 250, 250), (0, 0, 250), (0, 250, 0)] * 3
    cands = [Candidate(str(i), crop(c)) for i, c in enumerate(colours)]
    query = Query("standard", image=crop((250, 0, 0)))
    vision = identity(memory)
    vision.head.cfg.decoder_weight = 0.0
    reranker = BestChoiceReranker(model, processor, group_size=4, identity=vision)
    skipped = reranker.rerank(query, cands)
    monkeypatch.setattr(BestChoiceJudge, "reads_decoder", property(lambda self: True))
    computed = reranker.rerank(query, cands)
    assert skipped.stats.forwards == skipped.stats.vision_images == 0
    assert computed.stats.forwards > 0
    assert [t.chosen for t in skipped.turns] == [t.chosen for t in computed.turns]
    np.testing.assert_allclose([t.probability for t in skipped.turns],
                               [t.probability for t in computed.turns], rtol=0, atol=1e-12)


def test_memory_pointer_weighs_picks_by_their_turn_probability() -> None:
    to_query = np.array([1.0, 0.0, 0.0])
    between = np.array([[9.0, 2.0, 0.0], [2.0, 9.0, 4.0], [0.0, 4.0, 9.0]])
    assert memory_pointer(to_query, between, 0.5, []) is to_query
    np.testing.assert_allclose(memory_pointer(to_query, between, 0.5, [(0, 1.0)]),
                               to_query + 0.5 * between[0])
    mixed = memory_pointer(to_query, between, 1.0, [(0, 0.75), (1, 0.25)])
    np.testing.assert_allclose(mixed, to_query + 0.75 * between[0] + 0.25 * between[1])
    assert memory_pointer(to_query, between, 0.0, [(0, 1.0)]) is to_query


def test_a_head_saved_without_memory_loads_with_it_off(tmp_path) -> None:
    head = IdentityHead(IdentityConfig(feature_dim=3, encoder_version="v"))
    save_identity_head(head, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["memory"]  # as a head saved before memory existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_identity_head(tmp_path).cfg.memory == 0.0


def test_average_precision_over_a_shortlist() -> None:
    assert average_precision(np.array([True, False, True]), 2) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([False, True]), 4) == pytest.approx(0.5 / 4)


def _chains(n: int, seed: int) -> list[Shortlist]:
    """Shortlists where the person's second view is reachable only through the first."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = r.normal(size=16)
        a = q + r.normal(size=16) * 0.3
        b = a + r.normal(size=16) * 0.6 - 0.6 * q
        distractors = [q * 0.5 + r.normal(size=16) for _ in range(6)]
        cands = np.stack([a, *distractors, b]).astype(np.float32)
        relevant = np.array([True] + [False] * 6 + [True])
        out.append(Shortlist("standard", q.astype(np.float32), cands, relevant, 2))
    return out


def test_the_fit_turns_memory_on_where_it_helps_held_out_people() -> None:
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    weight, figures = fit_memory(head, _chains(40, 0))
    assert weight > 0 and figures[f"memory/mAP@{weight:g}"] > figures["memory/mAP@0"]


def test_the_fit_keeps_memory_off_where_it_changes_nothing() -> None:
    """One relevant item per shortlist, always picked first: no gain, so no memory."""
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    lists = [Shortlist(s.kind, s.query, s.candidates[:7], s.relevant[:7], 1)
             for s in _chains(20, 1)]
    weight, figures = fit_memory(head, lists)
    assert weight == 0.0 and figures["memory/shortlists"] == 20


def test_an_image_kind_reranks_with_its_own_memory_where_the_dialogue_gains() -> None:
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    fit = fit_kinds(head, _chains(40, 0))
    assert fit.abstain == [] and fit.memory["standard"] > 0
    assert "standard" not in fit.clue  # no text: no clue term
    assert fit.figures["kind/standard/gain_lower_bound"] > 0


def test_an_image_kind_whose_dialogue_loses_to_the_prefilter_abstains() -> None:
    """The prefilter's order puts the person first, but the head's metric prefers a distractor
    (nearer the query in its space): the dialogue would rank worse, so the kind abstains while
    another kind, on which it gains, still reranks."""
    r = np.random.default_rng(3)
    losing = []
    for _ in range(30):
        q = r.normal(size=16)
        person = q + r.normal(size=16) * 1.5
        near = [q + r.normal(size=16) * 0.2 for _ in range(3)]
        cands = np.stack([person, *near]).astype(np.float32)
        losing.append(Shortlist("visible_infrared", q.astype(np.float32), cands,
                                np.array([True, False, False, False]), 1))
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    fit = fit_kinds(head, losing + _chains(40, 0))
    assert fit.abstain == ["visible_infrared"]
    assert fit.figures["kind/visible_infrared/prefilter_mAP"] == pytest.approx(1.0)
    assert fit.figures["kind/visible_infrared/gain_lower_bound"] < 0
    assert fit.figures["kind/standard/abstain"] == 0.0


def test_a_kind_must_gain_in_every_regime_it_was_judged_in() -> None:
    """The dialogue gains on the training world's held-out people but loses on the fit world's
    (where the head's metric prefers a distractor to the person the prefilter put first): the
    kind abstains, and the figures say where it lost."""
    r = np.random.default_rng(5)
    gains = [dataclasses.replace(s, source=TRAINING_WORLD) for s in _chains(40, 0)]
    losses = []
    for _ in range(40):
        q = r.normal(size=16)
        cands = np.stack([q + r.normal(size=16) * 1.5,
                          *[q + r.normal(size=16) * 0.2 for _ in range(7)]]).astype(np.float32)
        losses.append(Shortlist("standard", q.astype(np.float32), cands,
                                np.array([True] + [False] * 7), 1, source=FIT_WORLD))
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    assert fit_kinds(head, gains).abstain == []  # judged on the training world alone: reranks
    fit = fit_kinds(head, gains + losses)
    assert fit.abstain == ["standard"]
    assert fit.figures[f"kind/standard/{TRAINING_WORLD}/gain_lower_bound"] > 0
    assert fit.figures[f"kind/standard/{FIT_WORLD}/gain_lower_bound"] < 0
    assert fit.figures["kind/standard/gain_lower_bound"] == \
        fit.figures[f"kind/standard/{FIT_WORLD}/gain_lower_bound"]
    assert fit.figures[f"kind/standard/{FIT_WORLD}/shortlists"] == 40


def test_a_kind_reranks_only_on_a_gain_that_holds_on_queries_it_was_not_chosen_on() -> None:
    """Shortlists where no setting truly beats the prefilter (the person's place is random and
    the features say nothing): the best of the grid's settings still looks ahead on the
    queries that chose it, so the verdict takes each query's gain with the settings chosen on
    the other half - and the kind abstains."""
    r = np.random.default_rng(7)
    noise = []
    for _ in range(40):
        relevant = np.zeros(8, bool)
        relevant[r.choice(8, size=2, replace=False)] = True
        noise.append(Shortlist("standard", r.normal(size=16).astype(np.float32),
                               r.normal(size=(8, 16)).astype(np.float32), relevant, 2))
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    fit = fit_kinds(head, noise)
    chosen = fit.figures[f"kind/standard/mAP@0,{fit.memory['standard']:g}"]
    assert chosen >= fit.figures["kind/standard/prefilter_mAP"]  # looks no worse where chosen
    assert fit.abstain == ["standard"]


def test_shortlists_follow_the_prefilter_and_skip_queries_without_a_match() -> None:
    feats = np.array([[1, 0], [0.9, 0.1], [0.1, 1], [0.95, 0.05], [0, 1]], np.float32)
    pids = np.array([0, 0, 1, 1, 2])
    lists = shortlists("standard", [0, 4], feats, pids,
                       [np.array([1, 2, 3]), np.array([0, 1, 2])], k=2)
    assert len(lists) == 1  # person 2 has no other crop: skipped
    np.testing.assert_array_equal(lists[0].candidates, feats[[3, 1]])  # nearest first
    assert lists[0].relevant.tolist() == [False, True] and lists[0].total == 1


def test_shortlists_take_the_order_the_site_serves() -> None:
    """A site serving the k-reciprocal shortlist fits its head's dialogue settings on that
    shortlist - the one the evaluation and the gate score (``k_reciprocal_shortlists``), not
    the cosine top K."""
    from chatreid.evaluation import EvalConfig
    from chatreid.evaluation.runner import k_reciprocal_shortlists

    from .test_reranking import clustered

    qf, gf, ql, gl = clustered(seed=5, people=12)
    feats = np.concatenate([qf, gf]).astype(np.float32)
    pids = np.concatenate([ql.pids, gl.pids])
    queries = list(range(len(qf)))
    gallery = [np.arange(len(qf), len(feats))] * len(queries)
    served = EvalConfig(shortlist_order="k_reciprocal", pool=40, k1=10, lambda_value=0.3)
    lists = shortlists("standard", queries, feats, pids, gallery, k=10, served=served)
    cosine = shortlists("standard", queries, feats, pids, gallery, k=10)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    want = k_reciprocal_shortlists(1 - unit[queries] @ unit[gallery[0]].T, unit[queries],
                                   unit[gallery[0]], pool=40, k1=10, lambda_value=0.3)
    for n, item in enumerate(lists):
        top = np.argsort(want[n], kind="stable")[:10]
        np.testing.assert_array_equal(item.candidates, feats[gallery[0][top]])
    assert sum(a.relevant.sum() for a in lists) > sum(c.relevant.sum() for c in cosine)
    same = EvalConfig(shortlist_order="cosine")
    for a, b in zip(shortlists("standard", queries, feats, pids, gallery, k=10, served=same),
                    cosine, strict=True):
        np.testing.assert_array_equal(a.candidates, b.candidates)


def _sample(task: str, images: list[str], infos: list[dict]) -> InstructionSample:
    return InstructionSample(task=task, stage=3, images=images,
                             prompt=IMAGE_TOKEN * len(images), response="1",
                             answer={"choice": 1},
                             meta={"query": infos[0], "gallery": infos[1:]})


def _entry(key: str, layout: str, pid: int, camid: int = 0, clothes_id: int = 0,
           modality: str = "rgb") -> ImageEntry:
    return ImageEntry(path=key, relpath=key, layout=layout, pid=pid, clothes_id=clothes_id,
                      camid=camid, modality=modality, split="train", bbox=(0, 0, 8, 16),
                      attributes={}, captions=(), sighting=(key,))


def test_world_shortlists_keep_each_tasks_protocol_over_the_whole_layout() -> None:
    """Every crop of a held-out person queries its task's layout: a same-camera view of the
    person is no match for a standard query, a cloth-changing query matches only other
    clothes, a visible-infrared one only the other modality; others' crops do not query."""
    vec = {"q": [1, 0], "same_cam": [1, 0.01], "other_cam": [0.8, 0.6], "x": [0.9, 0.4],
           "ir": [0.7, 0.7], "rgb_x": [0.95, 0.3]}
    entries = [_entry("q", "market1501", 0), _entry("same_cam", "market1501", 0),
               _entry("other_cam", "market1501", 0, camid=1), _entry("x", "market1501", 1, 1),
               _entry("q", "ltcc", 0, clothes_id=0), _entry("same_cam", "ltcc", 0, clothes_id=1),
               _entry("x", "ltcc", 1),
               _entry("q", "sysu_mm01", 0), _entry("ir", "sysu_mm01", 0, modality="infrared"),
               _entry("rgb_x", "sysu_mm01", 1)]

    def features(keys: list[str]) -> np.ndarray:
        return np.array([vec[k] for k in keys], np.float32)

    lists = world_shortlists(entries, {"0"}, features, k=5)
    by = {(s.kind, tuple(s.query)): s for s in lists}
    q = tuple(features(["q"])[0])
    assert {k for k, _ in by} == {"standard", "cloth_changing", "visible_infrared"}
    assert not any(query == tuple(features(["x"])[0]) for _, query in by)  # not held out
    standard = by["standard", q]
    np.testing.assert_array_equal(standard.candidates, features(["x", "other_cam"]))
    assert standard.relevant.tolist() == [False, True] and standard.total == 1
    assert by["standard", tuple(features(["other_cam"])[0])].total == 2  # both on camera 0
    assert by["cloth_changing", q].total == 1  # same camera, other clothes: a match
    np.testing.assert_array_equal(by["visible_infrared", q].candidates, features(["ir"]))


def test_a_kind_whose_learned_metric_loses_to_the_plain_cosine_runs_on_the_cosine() -> None:
    """A learned metric that weighs the one feature that misleads on new people: the fit
    keeps the plain cosine for that kind (and the head applies it), not the other kinds."""
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    with torch.no_grad():
        head.metric[head.kind_index("standard")] = torch.zeros(16)
        head.metric[head.kind_index("standard"), 0] = 1.0  # one dimension, of noise
    lists = []
    for item in _chains(40, 2):
        cands = item.candidates.copy()
        cands[:, 0] = np.random.default_rng(len(lists)).normal(size=len(cands)) * 5
        lists.append(Shortlist("standard", item.query, cands, item.relevant, item.total))
    fit = fit_kinds(head, lists)
    assert fit.plain == ["standard"] and fit.figures["kind/standard/plain"] == 1.0
    before = head.score(torch.from_numpy(lists[0].query), torch.from_numpy(lists[0].candidates),
                        "standard")
    head.make_plain("standard")
    plain = head.score(torch.from_numpy(lists[0].query), torch.from_numpy(lists[0].candidates),
                       "standard")
    q = lists[0].query / np.linalg.norm(lists[0].query)
    c = lists[0].candidates / np.linalg.norm(lists[0].candidates, axis=1, keepdims=True)
    np.testing.assert_allclose(plain, INITIAL_SCALE * (c @ q), rtol=1e-4, atol=1e-4)
    assert not np.allclose(before, plain)


def _groups(n: int, seed: int, decoder_knows: bool) -> tuple[list[Group], dict[str, np.ndarray]]:
    """Groups of 6 where the features show the match faintly, and the decoder either knows the
    answer (a strong, right prior) or guesses (a strong, random one)."""
    r = np.random.default_rng(seed)
    feats, groups = {}, []
    for p in range(n):
        me = r.normal(size=16)
        feats[f"{p}/q"] = me.astype(np.float32)
        feats[f"{p}/0"] = (me + r.normal(size=16) * 1.5).astype(np.float32)
        for j in range(1, 6):
            feats[f"{p}/{j}"] = r.normal(size=16).astype(np.float32)
        prior = np.where(np.arange(6) == 0, 4.0, 0.0) if decoder_knows else r.normal(size=6) * 4
        groups.append(Group("standard", f"{p}/q", tuple(f"{p}/{j}" for j in range(6)), 0, p,
                            tuple(float(x) for x in prior)))
    return groups, feats


@pytest.mark.parametrize(("decoder_knows", "expected"), [(False, 0.0), (True, 1.0)])
def test_the_decoder_weight_follows_what_the_decoder_knows(decoder_knows, expected) -> None:
    head = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    groups, feats = _groups(200, 4, decoder_knows)
    weight, figures = fit_decoder_weight(head, groups, feats)
    assert weight == expected and figures["decoder_weight/groups"] == 200
    assert fit_decoder_weight(head, [Group(g.task, g.query, g.candidates, g.answer, g.pid)
                                     for g in groups], feats) == (1.0, {})  # nothing to fit on


def test_a_turn_weighs_the_decoder_as_the_head_says(tiny) -> None:
    """decoder_weight 0: the turn's answer is the head's alone, whatever the decoder says."""
    model, processor = tiny
    images = [crop(c) for c in [(250, 250, 0), (0, 250, 250), (0, 0, 250), (0, 250, 0)]]
    query = Query("standard", image=crop((250, 0, 0)))
    vision = identity(0.0)
    tokens = choice_tokens(processor.tokenizer, 4)
    vision.head.cfg.decoder_weight = 0.0
    pointer = vision.scores(crop((250, 0, 0)), images, "standard")
    for reuse in (True, False):
        judge = make_judge(model, processor, query, images, tokens, reuse, vision)
        alone = judge(range(4))
        np.testing.assert_allclose(alone, np.exp(pointer - pointer.max()) /
                                   np.exp(pointer - pointer.max()).sum(), rtol=1e-6)
        # logits weighed 0 are never computed: no decoder forward, no ViT pass
        assert judge.stats.forwards == judge.stats.vision_images == 0
    vision.head.cfg.decoder_weight = 1.0
    judge = make_judge(model, processor, query, images, tokens, True, vision)
    mixed = judge(range(4))
    assert not np.allclose(mixed, alone)
    assert judge.stats.forwards == 2  # the query prefix, then the group


def test_the_fit_world_has_new_people_and_cameras_and_shortlists_for_every_kind(
        tmp_path) -> None:
    """The reranker's settings are judged on a world from the training world's recipe with
    another seed: none of its crops or cameras is the training world's, it is generated once,
    and its crops give every kind shortlists (clue kinds too, from its own stage-3 clues)."""
    from chatreid.data.instructions.samples import load_entries
    from chatreid.synth import SynthConfig, generate_world
    from chatreid.tuning.identity import (
        FIT_SPLITS,
        fit_world,
        fit_world_clue_samples,
        held_out_clue_shortlists,
    )

    recipe = SynthConfig.tiny(seed=3)
    training = tmp_path / "training"
    generate_world(training, recipe, progress=False)
    root = fit_world(tmp_path / "cache", recipe)
    assert json.loads((root / "manifest.json").read_text())["seed"] == recipe.seed + 1_000_003_000
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert fit_world(tmp_path / "cache", recipe) == root  # generated once
    assert (root / "manifest.json").stat().st_mtime_ns == stamp

    def pixels(folder, e: ImageEntry) -> bytes:
        return (folder / e.relpath).read_bytes()

    mine = load_entries(root, FIT_SPLITS)
    theirs = load_entries(training, FIT_SPLITS)
    assert not {pixels(root, e) for e in mine} & {pixels(training, e) for e in theirs}

    cache: dict[str, np.ndarray] = {}

    def features(keys: list[str]) -> np.ndarray:  # a colour-mean stand-in for the backbone
        for k in keys:
            if k not in cache:
                cache[k] = np.asarray(Image.open(root / k).convert("RGB"), np.float32) \
                    .reshape(-1, 3).mean(0) + 1.0
        return np.stack([cache[k] for k in keys])

    people = {str(e.pid) for e in mine}
    lists = world_shortlists(mine, people, features, max_queries=20)
    kinds = {s.kind for s in lists}
    assert kinds == {"standard", "cloth_changing", "visible_infrared"}
    assert all(sum(s.kind == k for s in lists) <= 20 for k in kinds)
    samples = fit_world_clue_samples(root, seed=0, n=60)
    assert samples and all(s.meta.get("clue") for s in samples)
    relpaths = {e.relpath for e in mine}  # named world-relative, as the crops' keys are
    assert all(key in relpaths for s in samples for key in s.images)

    def colours(keys: list[str]) -> np.ndarray:
        from chatreid.embedder.colour import ColourAttributeMatcher

        return ColourAttributeMatcher().embed_images([Image.open(root / k) for k in keys])

    clue = held_out_clue_shortlists(samples, mine, people, features, colours)
    assert {s.kind for s in clue} == {"text_to_image", "attribute", "multimodal"}
