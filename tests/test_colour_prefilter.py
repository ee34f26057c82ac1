"""The text prefilter: captions and attributes parsed to garment colours, crops to colour
histograms, and text-to-image retrieval on the synthetic world well above chance."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from chatreid.embedder.colour import COLOUR_TERMS, ColourAttributeMatcher


@pytest.fixture(scope="module")
def colour() -> ColourAttributeMatcher:
    return ColourAttributeMatcher()


@pytest.mark.parametrize(("text", "expected"), [
    ("A man wearing a red t-shirt and blue jeans.", {"upper": "red", "lower": "blue"}),
    ("A woman in black trousers and a white shirt", {"upper": "white", "lower": "black"}),
    ("He wears a purple and tan striped short-sleeved top and gray pants.",
     {"upper": "purple", "lower": "grey"}),  # main colour first; synonyms
    ("a dark blue hooded sweatshirt", {"upper": "navy"}),  # two-word colour, lower unnamed
    ("The lady is dressed in a beige long coat with a red logo on the front.",
     {"upper": "beige"}),  # the logo's colour is not the coat's
    ("A person walking past a red car.", {}),
])
def test_captions_name_garment_colours(colour, text, expected) -> None:
    assert colour.parse(text) == expected


def test_attribute_mappings_are_read_directly(colour) -> None:
    assert colour.parse({"upper_colour": "Gray", "lower_colour": "navy", "gender": "male"}) == {
        "upper": "grey", "lower": "navy"}
    assert colour.parse({"upper_colour": "teal"}) == {}  # not a basic colour term: no claim


def person(upper: str, lower: str) -> Image.Image:
    img = Image.new("RGB", (64, 128), (90, 140, 90))
    draw = ImageDraw.Draw(img)
    draw.rectangle((16, 20, 48, 64), fill=COLOUR_TERMS[upper])
    draw.rectangle((18, 66, 46, 120), fill=COLOUR_TERMS[lower])
    return img


def test_distance_counts_the_named_parts(colour) -> None:
    images = colour.embed_images([person("red", "blue"), person("red", "black"),
                                  person("yellow", "blue")])
    texts = colour.embed_texts(["a red shirt and blue jeans", "a red jacket",
                                "someone in a hat"])
    d = colour.distance(texts, images)
    assert d.shape == (3, 3)
    assert d[0].tolist() == pytest.approx([0.0, 0.5, 0.5])  # both parts, one part, one part
    assert d[1, :2].tolist() == pytest.approx([0.0, 0.0]) and d[1, 2] == pytest.approx(1.0)
    assert d[2].tolist() == pytest.approx([1.0, 1.0, 1.0])  # nothing named: no preference


def test_text_to_image_on_the_world_beats_chance(world, colour) -> None:
    from chatreid.data.datasets import DATASETS
    from chatreid.metrics import Labels, rank_metrics

    ds = DATASETS["cuhk_pedes"](world)
    queries = [(r.pid, c) for r in ds.query for c in r.captions]
    gallery = colour.embed_images([Image.open(r.path) for r in ds.gallery])
    dist = colour.distance(colour.embed_texts([c for _, c in queries]), gallery)
    q = Labels(np.array([p for p, _ in queries]), np.zeros(len(queries)))
    g = Labels(np.array([r.pid for r in ds.gallery]), np.ones(len(ds.gallery)))
    found = rank_metrics(dist, q, g, "text")
    # Chance: the share of the gallery that is the query's person, on average.
    chance = float(np.mean([(g.pids == p).mean() for p, _ in queries]))
    assert found.mAP > 2 * chance and found.rank(1) > 2 * chance


@pytest.mark.stack
def test_crops_colour_vectors_are_cached_and_a_missing_crop_matches_nothing(settings) -> None:
    import io

    from chatreid.prefilter.search import ColourCache
    from chatreid.storage import ObjectStore

    objects = ObjectStore(settings.s3)
    buf = io.BytesIO()
    person("red", "blue").save(buf, "PNG")
    objects.put("crops/painted.png", buf.getvalue())
    cache = ColourCache(objects, workers=2)
    vectors = cache.vectors([("painted", "crops/painted.png"), ("gone", "crops/deleted.png")])
    text = ColourAttributeMatcher().embed_texts(["a red shirt and blue jeans"])
    assert ColourAttributeMatcher().distance(text, vectors)[0].tolist() == pytest.approx(
        [0.0, 1.0])  # the deleted crop only loses its own match; the query goes on
    assert "painted" in cache._cache and "gone" not in cache._cache  # retried next time
