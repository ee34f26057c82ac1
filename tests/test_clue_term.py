"""The clue term: a query's text clue (text-to-image, attribute, multimodal) enters every turn's
pointer term as its colour-attribute match with each candidate, weighted per kind as fitted on
held-out people, so a text query is no longer judged by the decoder alone (at chance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.data.instructions import build_stage3
from chatreid.data.instructions.samples import IMAGE_TOKEN, ImageEntry, InstructionSample
from chatreid.embedder.colour import ColourAttributeMatcher
from chatreid.model import build_model
from chatreid.model.identity import (
    IdentityConfig,
    IdentityHead,
    IdentityVision,
    clue_match,
    load_identity_head,
    save_identity_head,
)
from chatreid.model.prompting import choice_tokens
from chatreid.rerank import BestChoiceReranker, Candidate, Query, attribute_text
from chatreid.rerank.judge import make_judge
from chatreid.tuning.identity import (
    Shortlist,
    fit_kinds,
    gain_lower_bound,
    held_out_clue_shortlists,
)

RGB = {"red": (200, 20, 20), "green": (20, 160, 40), "blue": (20, 40, 200),
       "black": (10, 10, 10), "white": (245, 245, 245), "yellow": (240, 220, 20)}


def outfit(upper: str, lower: str) -> Image.Image:
    """A head-to-foot crop: the torso band in ``upper``, the legs band in ``lower``."""
    im = Image.new("RGB", (32, 64), RGB[upper])
    im.paste(RGB[lower], (0, 34, 32, 64))
    return im


class MeanColourBackbone:
    """Features = the crop's mean colour: enough for the head's relations under test."""

    version = "mean-colour-test"
    dim = 3

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return np.array([np.asarray(im.convert("RGB"), np.float32).mean((0, 1)) + 1.0
                         for im in images], np.float32)


def vision(**cfg) -> IdentityVision:
    head = IdentityHead(IdentityConfig(feature_dim=3, encoder_version="mean-colour-test",
                                       decoder_weight=0.0, **cfg))
    return IdentityVision(MeanColourBackbone(), head)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


def test_an_attribute_list_names_the_garment_colours() -> None:
    """The VLM reads attributes as ``label: value``; the colour matcher reads the same text."""
    matcher = ColourAttributeMatcher()
    text = attribute_text({"gender": "male", "upper_colour": "red", "lower_colour": "dark blue"})
    assert matcher.parse(text) == {"upper": "red", "lower": "navy"}
    assert matcher.parse("upper clothing: jacket") == {}  # names no colour: no clue
    # a labelled colour wins over the free text's, which fills the other part
    assert matcher.parse("a man in a red shirt and blue jeans; upper clothing colour: green") \
        == {"upper": "green", "lower": "blue"}


def test_clue_match_is_the_share_of_the_named_colours() -> None:
    cands = [outfit("green", "black"), outfit("green", "white"), outfit("red", "white")]
    match = clue_match("a woman in a green jacket and black trousers", cands)
    assert match[0] == pytest.approx(1.0) and match[1] == pytest.approx(0.5)
    assert match[2] == pytest.approx(0.0)
    assert clue_match("a tall person", cands).tolist() == [0.0, 0.0, 0.0]


def test_a_text_query_is_ranked_by_its_clue(tiny) -> None:
    model, processor = tiny
    names = ["red/white", "green/white", "yellow/black", "green/black"]
    cands = [Candidate(n, outfit(*n.split("/"))) for n in names]
    query = Query("text_to_image", text="A man in a green t-shirt and black trousers.")
    reranker = BestChoiceReranker(model, processor, group_size=4,
                                  identity=vision(clue={"text_to_image": 40.0}))
    result = reranker.rerank(query, cands)
    assert [t.chosen for t in result.turns][:2] == ["green/black", "green/white"]
    assert result.ranking[0].confidence > 0.9  # the clue decided turn 1


def test_a_kind_without_a_clue_weight_is_left_to_the_decoder(tiny) -> None:
    model, processor = tiny
    tokens = choice_tokens(processor.tokenizer, 4)
    images = [outfit("red", "white"), outfit("green", "black")]
    text = Query("text_to_image", text="a green shirt and black trousers")
    no_clue = vision(clue={"attribute": 40.0})  # weighs attribute queries only
    assert make_judge(model, processor, text, images, tokens, True, no_clue).pointer is None
    assert not no_clue.applies_to("text_to_image") and no_clue.applies_to("attribute_query")
    judge = make_judge(model, processor, text, images, tokens, True,
                       vision(clue={"text_to_image": 10.0}))
    np.testing.assert_allclose(judge.pointer, [0.0, 10.0])


def test_a_multimodal_query_adds_the_clue_to_the_image_term() -> None:
    images = [outfit("green", "black"), outfit("red", "white")]
    query_image = outfit("red", "white")
    plain = vision().pointer_terms("multimodal", query_image, "a green top", images)
    with_clue = vision(clue={"multimodal": 30.0}).pointer_terms(
        "multimodal", query_image, "a green top", images)
    assert plain is not None and with_clue is not None
    np.testing.assert_allclose(with_clue[0] - plain[0], 30.0 * np.array([1.0, 0.0]))


def test_memory_is_per_kind_where_fitted() -> None:
    cfg = IdentityConfig(feature_dim=3, encoder_version="v", memory=2.0,
                         kind_memory={"attribute_query": 0.0})
    assert cfg.kind_memory == {"attribute": 0.0}  # stage 3's task name read as the query kind
    assert cfg.memory_of("attribute") == 0.0 and cfg.memory_of("standard") == 2.0
    terms = vision(clue={"attribute": 5.0}, memory=1.0, kind_memory={"attribute": 0.0}) \
        .pointer_terms("attribute", None, "upper clothing colour: red", [outfit("red", "red")])
    assert terms is not None and terms[1] is None  # no memory: no relations computed
    remembering = vision(clue={"text_to_image": 5.0}, memory=1.0).pointer_terms(
        "text_to_image", None, "a red shirt", [outfit("red", "red"), outfit("blue", "red")])
    assert remembering is not None and remembering[1] is not None
    assert remembering[1].shape == (2, 2)


def test_a_head_saved_before_the_clue_term_has_none(tmp_path) -> None:
    save_identity_head(IdentityHead(IdentityConfig(feature_dim=3, encoder_version="v")), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["clue"], config["kind_memory"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    head = load_identity_head(tmp_path)
    assert head.cfg.clue == {} and head.cfg.kind_memory == {}
    assert IdentityVision(_Versioned(), head).pointer_terms(
        "text_to_image", None, "a red shirt", [outfit("red", "red")]) is None


class _Versioned(MeanColourBackbone):
    version = "v"


def _described(n: int, seed: int, image_misleads: bool) -> list[Shortlist]:
    """Multimodal shortlists of 6: the person's crop matches the clue; with ``image_misleads``
    another person's crop is nearest the query image."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = r.normal(size=8)
        cands = [q + r.normal(size=8) * (2.0 if image_misleads else 0.4)]
        cands += [q + r.normal(size=8) * (0.3 if image_misleads and j == 0 else 2.0)
                  for j in range(5)]
        match = np.array([1.0] + [float(r.uniform(0, 0.6)) for _ in range(5)])
        relevant = np.array([True] + [False] * 5)
        order = r.permutation(6)
        out.append(Shortlist("multimodal", q.astype(np.float32),
                             np.stack(cands)[order].astype(np.float32), relevant[order], 1,
                             match[order]))
    return out


def test_the_clue_fit_weighs_a_clue_that_finds_the_person() -> None:
    head = IdentityHead(IdentityConfig(feature_dim=8, encoder_version="v",
                                       kinds=["standard", "multimodal"]))
    fit = fit_kinds(head, _described(30, 0, image_misleads=True))
    assert set(fit.clue) == {"multimodal"} and fit.clue["multimodal"] > 0
    best = fit.figures[f"kind/multimodal/mAP@{fit.clue['multimodal']:g},"
                       f"{fit.memory['multimodal']:g}"]
    assert best > fit.figures["kind/multimodal/mAP@0,0"]
    # the prefilter's order (shuffled here) is far worse: the kind reranks
    assert fit.abstain == [] and fit.figures["kind/multimodal/gain_lower_bound"] > 0


def test_a_kind_whose_dialogue_does_not_beat_the_prefilter_abstains() -> None:
    """Shortlists whose prefilter order already puts the person first: no dialogue can gain."""
    head = IdentityHead(IdentityConfig(feature_dim=8, encoder_version="v",
                                       kinds=["standard", "multimodal"]))
    lists = []
    for s in _described(30, 2, image_misleads=True):
        first = np.argsort(~s.relevant, kind="stable")
        lists.append(Shortlist(s.kind, s.query, s.candidates[first], s.relevant[first], s.total,
                               s.match[first]))
    fit = fit_kinds(head, lists)
    assert fit.abstain == ["multimodal"]
    assert fit.figures["kind/multimodal/prefilter_mAP"] == pytest.approx(1.0)
    assert fit.figures["kind/multimodal/gain_lower_bound"] <= 0


def test_gain_lower_bound_needs_more_than_a_few_lucky_queries() -> None:
    assert gain_lower_bound([0.1] * 25) == pytest.approx(0.1)
    assert gain_lower_bound([0.5] + [-0.01] * 24) <= 0  # one query carries the mean
    assert gain_lower_bound([]) == 0.0


def test_an_abstaining_kind_keeps_the_prefilter_order(tiny) -> None:
    model, processor = tiny
    names = ["red/white", "green/white", "yellow/black", "green/black"]
    cands = [Candidate(n, outfit(*n.split("/")), 0.9 - 0.1 * i) for i, n in enumerate(names)]
    query = Query("text_to_image", text="A man in a green t-shirt and black trousers.")
    reranker = BestChoiceReranker(model, processor, group_size=4, identity=vision(
        clue={"text_to_image": 40.0}, abstain=["text_to_image"]))
    result = reranker.rerank(query, cands)
    assert [r.candidate_id for r in result.ranking] == names
    assert not any(r.reranked for r in result.ranking) and result.turns == []
    assert result.stats.forwards == 0
    other = reranker.rerank(Query("attribute", text="upper clothing colour: green"), cands)
    assert other.turns  # only the kind it abstains on


def test_a_text_kind_always_gets_a_clue_weight() -> None:
    head = IdentityHead(IdentityConfig(feature_dim=8, encoder_version="v"))
    lists = [Shortlist("text_to_image", None, s.candidates, s.relevant, s.total, s.match)
             for s in _described(10, 1, image_misleads=False)]
    fit = fit_kinds(head, lists)
    assert fit.clue["text_to_image"] > 0 and fit.memory["text_to_image"] == 0.0  # one view
    assert fit.figures["kind/text_to_image/mAP@5,0"] == pytest.approx(1.0)  # the clue finds them
    assert "kind/text_to_image/mAP@0,0" not in fit.figures


def test_held_out_clue_shortlists_follow_the_text_prefilter() -> None:
    crops = {"a": outfit("green", "black"), "b": outfit("red", "white"),
             "c": outfit("green", "white"), "d": outfit("blue", "black")}
    info = {"a": 0, "b": 1, "c": 2, "d": 0}
    matcher = ColourAttributeMatcher()

    def sample(images: list[str], target: str, clue: str | None) -> InstructionSample:
        meta = {"query": {"pid": info[target]}, "gallery": [{"pid": info[k]} for k in images],
                "query_is_image": False} | ({"clue": clue} if clue else {})
        return InstructionSample(task="text_to_image", stage=3, images=images,
                                 prompt=IMAGE_TOKEN * len(images), response="1",
                                 answer={"choice": 1}, meta=meta)

    samples = [sample(["b", "c", "a"], "a", "a green shirt and black trousers"),
               sample(["d", "b"], "d", "a blue shirt"),
               sample(["a", "c"], "a", None),  # a dataset before clues: nothing to fit on
               sample(["b", "c"], "b", "a red shirt")]  # person 1: not held out

    def features(keys: list[str]) -> np.ndarray:
        return MeanColourBackbone().embed([crops[k] for k in keys])

    # the gallery is the task's whole layout in the world, not only the crops samples show
    entries = [ImageEntry(path=k, relpath=k, layout="cuhk_pedes", pid=pid, clothes_id=0,
                          camid=0, modality="rgb", split="train", bbox=(0, 0, 8, 16),
                          attributes={}, captions=(), sighting=(k,)) for k, pid in info.items()]
    lists = held_out_clue_shortlists(samples, entries, {"0"}, features,
                                     lambda keys: matcher.embed_images([crops[k] for k in keys]))
    assert len(lists) == 2 and {s.kind for s in lists} == {"text_to_image"}
    assert all(len(s.candidates) == 4 for s in lists)  # every crop of the layout
    first = lists[0]
    assert first.query is None and first.total == 2  # a and d are both person 0
    assert first.relevant[0] and first.match[0] == pytest.approx(1.0)  # a: both colours match
    assert first.match.tolist() == sorted(first.match.tolist(), reverse=True)


def test_stage3_text_samples_carry_their_clue(world) -> None:
    samples = build_stage3(world, seed=0, n=120)
    texts = [s for s in samples if s.task in ("text_to_image", "attribute_query", "multimodal")]
    assert texts and all(s.meta["clue"] and s.meta["clue"] in s.prompt for s in texts)
    assert all("clue" not in s.meta for s in samples if s not in texts)


def test_the_head_weighs_the_clue_as_the_turn_answers(tiny) -> None:
    """A turn's answer is softmax(pointer) when the decoder weight is 0: the clue's weight sets
    how sure it is."""
    model, processor = tiny
    images = [outfit("green", "black"), outfit("green", "white")]
    text = Query("text_to_image", text="a green shirt and black trousers")
    tokens = choice_tokens(processor.tokenizer, 2)
    sure = make_judge(model, processor, text, images, tokens, True,
                      vision(clue={"text_to_image": 20.0}))(range(2))
    unsure = make_judge(model, processor, text, images, tokens, True,
                        vision(clue={"text_to_image": 2.0}))(range(2))
    np.testing.assert_allclose(sure, torch.softmax(torch.tensor([20.0, 10.0]), 0).numpy(),
                               rtol=1e-5)
    assert sure[0] > unsure[0] > 0.5


def test_an_answer_with_no_reranked_result_says_prefilter_only(tiny) -> None:
    """The API's ``prefilter_only`` tells the investigator the model abstained on the kind."""
    from datetime import UTC, datetime

    from chatreid.prefilter.search import SearchResult
    from chatreid.query.answer import assemble
    from chatreid.query.shortlist import Shortlist as QueryShortlist
    from chatreid.query.vlm import RerankAnswer
    from schemas.api import QueryKind, QueryRequest

    model, processor = tiny
    names = ["c0", "c1", "c2"]
    items = [SearchResult(i + 1, n, 0.9 - 0.1 * i, "cam", "rgb", datetime.now(UTC), f"k{i}")
             for i, n in enumerate(names)]
    shortlist = QueryShortlist(QueryKind.TEXT_TO_IMAGE, None, None, "rgb", items, 3, "emb")
    cands = [Candidate(n, outfit("green", "black"), 0.9) for n in names]
    request = QueryRequest(kind="text_to_image", text="a green shirt")
    answers = {}
    for abstain in ([], ["text_to_image"]):
        reranker = BestChoiceReranker(model, processor, group_size=4, identity=vision(
            clue={"text_to_image": 10.0}, abstain=abstain))
        result = reranker.rerank(Query("text_to_image", text="a green shirt"), cands)
        answers[bool(abstain)] = assemble(request, shortlist, RerankAnswer(result, {}, "v"),
                                          query_id="q", base_url="http://x", elapsed_ms=1.0)
    assert answers[True].prefilter_only and not answers[False].prefilter_only
    assert [r.crop_id for r in answers[True].results] == names
