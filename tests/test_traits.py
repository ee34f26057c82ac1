"""The trait reader: persistent body traits from a crop, for cloth-changing queries."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from chatreid.data.instructions.samples import load_entries
from chatreid.model.identity import (
    IDENTITY_DIR,
    TRAITS_DIR,
    IdentityConfig,
    IdentityHead,
    IdentityVision,
    load_identity_head,
    save_identity_head,
)
from chatreid.model.traits import (
    CONFIG_FILE,
    TRAITS,
    LabelledCrop,
    TraitError,
    TraitReader,
    TraitReaderConfig,
    labelled_crops,
    train_trait_reader,
)
from chatreid.tuning.identity import Shortlist, fit_kinds, shortlists
from tests.test_clue_term import MeanColourBackbone


@pytest.fixture(scope="module")
def trained(world):
    crops = labelled_crops(load_entries(world))
    reader = train_trait_reader(crops, lambda key: Image.open(world / key),
                                TraitReaderConfig(epochs=100, batch_size=8))
    return reader, [dataclasses.replace(c, key=str(world / c.key)) for c in crops]


def test_the_reader_learns_the_traits_of_its_train_crops(trained):
    reader, crops = trained
    read = reader.split(reader.read([Image.open(c.key) for c in crops]))
    for t, values in TRAITS.items():
        truth = np.array([values.index(c.traits[t]) for c in crops])
        majority = np.bincount(truth).max() / len(truth)
        if majority < 1:  # a trait the tiny world's people all share teaches nothing
            assert (read[t].argmax(1) == truth).mean() > majority, t
        assert np.allclose(read[t].sum(1), 1, atol=1e-5)
    described = reader.describe(Image.open(crops[0].key))
    assert set(described) == set(TRAITS)
    assert all(described[t] in TRAITS[t] for t in TRAITS)


def test_agreement_is_highest_when_every_trait_agrees_and_falls_with_each_that_does_not():
    reader = TraitReader.__new__(TraitReader)
    reader.sizes = [len(v) for v in TRAITS.values()]

    def person(**changed: int) -> np.ndarray:
        return np.concatenate([np.eye(len(v))[changed.get(t, 0)] for t, v in TRAITS.items()])

    a = person()[None]
    others = np.stack([person(), person(hair_colour=1), person(hair_colour=1, skin_tone=2)])
    score = reader.match(a, others)[0]
    assert score[0] > score[1] > score[2]


def test_a_saved_reader_reads_the_same_and_a_changed_one_is_refused(trained, tmp_path):
    reader, crops = trained
    reader.save(tmp_path / "r")
    again = TraitReader.load(tmp_path / "r")
    images = [Image.open(c.key) for c in crops[:4]]
    assert again.version == reader.version
    assert np.allclose(again.read(images), reader.read(images))

    meta = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    meta["traits"]["hair_colour"] = [*meta["traits"]["hair_colour"], "green"]
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(TraitError, match="vocabulary"):
        TraitReader.load(tmp_path / "r")

    reader.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())
    meta["version"] = "traits-000000000000"
    (tmp_path / "s" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(TraitError, match="do not match"):
        TraitReader.load(tmp_path / "s")


def test_labels_outside_the_vocabulary_are_refused(trained):
    _, crops = trained
    odd = LabelledCrop(crops[0].key, {**crops[0].traits, "hair_colour": "green"})
    with pytest.raises(TraitError, match="vocabulary"):
        train_trait_reader([odd], Image.open, TraitReaderConfig(epochs=1))


# -- the trait term: the identity head's reading of what survives a change of clothes ------------

def crop(head: tuple[int, int, int], body: tuple[int, int, int]) -> Image.Image:
    im = Image.new("RGB", (32, 64), body)
    im.paste(head, (8, 0, 24, 14))
    return im


def test_a_head_with_a_trait_weight_adds_the_trait_agreement_and_keeps_it_when_saved(
        trained, tmp_path):
    reader, _ = trained
    query = crop((80, 50, 30), (200, 20, 20))
    candidates = [crop((80, 50, 30), (20, 20, 200)), crop((240, 220, 200), (200, 20, 20))]

    def vision(**cfg) -> IdentityVision:
        head = IdentityHead(IdentityConfig(feature_dim=3, encoder_version="mean-colour-test",
                                           decoder_weight=0.0, **cfg))
        return IdentityVision(MeanColourBackbone(), head, reader)

    plain = vision().pointer_terms("cloth_changing", query, None, candidates)
    weighed = vision(traits={"cloth_changing": 2.0})
    terms = weighed.pointer_terms("cloth_changing", query, None, candidates)
    assert plain is not None and terms is not None
    read = reader.read([query, *candidates])
    assert np.allclose(terms[0], plain[0] + 2.0 * reader.match(read[:1], read[1:])[0])
    # another kind without a weight is scored by the image term alone
    other = weighed.pointer_terms("standard", query, None, candidates)
    assert other is not None
    assert np.allclose(other[0], vision().pointer_terms("standard", query, None,
                                                        candidates)[0])  # pyright: ignore[reportOptionalSubscript]

    save_identity_head(weighed.head, tmp_path / IDENTITY_DIR)
    reader.save(tmp_path / IDENTITY_DIR / TRAITS_DIR)
    head = load_identity_head(tmp_path / IDENTITY_DIR)
    again = IdentityVision(MeanColourBackbone(), head,
                           TraitReader.load(tmp_path / IDENTITY_DIR / TRAITS_DIR))
    assert head.cfg.traits == {"cloth_changing": 2.0}
    assert np.allclose(again.pointer_terms("cloth_changing", query, None, candidates)[0],  # pyright: ignore[reportOptionalSubscript]
                       terms[0])


def _shortlists(kind: str, informative: bool, n: int = 40, k: int = 10) -> list[Shortlist]:
    """Held-out shortlists whose image features say nothing (the person in other clothes) and
    whose trait agreement points at the person (``informative``) or is noise."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        relevant = np.zeros(k, bool)
        relevant[rng.integers(0, k)] = True  # the prefilter at chance
        agree = rng.normal(-6, 1, k)
        if informative:
            agree[relevant] = -0.5
        out.append(Shortlist(kind, rng.normal(size=4), rng.normal(size=(k, 4)), relevant, 1,
                             traits=agree))
    return out


def test_the_fit_weighs_traits_where_they_find_the_person_and_not_where_they_are_noise():
    head = IdentityHead(IdentityConfig(feature_dim=4, encoder_version="x"))
    fit = fit_kinds(head, _shortlists("cloth_changing", True))
    assert fit.traits["cloth_changing"] > 0
    assert "cloth_changing" not in fit.abstain
    noise = fit_kinds(head, _shortlists("cloth_changing", False))
    assert "cloth_changing" in noise.abstain


def test_shortlists_carry_the_queries_trait_agreement_with_their_candidates(trained):
    reader, crops = trained
    reads = reader.read([Image.open(c.key) for c in crops])
    unit = np.random.default_rng(0).normal(size=(len(crops), 4))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    pids = np.array([c.key.rsplit("/", 1)[-1].split("_")[0] for c in crops])
    query = next(i for i in range(len(crops)) if (pids == pids[i]).sum() > 1)
    allowed = [np.array([j for j in range(len(crops)) if j != query])]
    (item,) = shortlists("cloth_changing", [query], unit, pids, allowed, k=5,
                         traits=(reader, reads))
    top = allowed[0][np.argsort(1.0 - unit[allowed[0]] @ unit[query], kind="stable")[:5]]
    assert np.allclose(item.candidates, unit[top])
    assert item.traits is not None
    assert np.allclose(item.traits, reader.match(reads[query:query + 1], reads[top])[0])
