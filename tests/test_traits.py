"""The trait reader: persistent body traits from a crop, for cloth-changing queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chatreid.embedder.traits import (
    CONFIG_FILE,
    TRAITS,
    LabelledCrop,
    TraitError,
    TraitReader,
    TraitReaderConfig,
    labelled_crops,
    train_trait_reader,
)


@pytest.fixture(scope="module")
def trained(world):
    crops = labelled_crops(world)
    reader = train_trait_reader(crops, TraitReaderConfig(epochs=100, batch_size=8))
    return reader, crops


def test_the_reader_learns_the_traits_of_its_train_crops(trained):
    reader, crops = trained
    read = reader.split(reader.read([Image.open(c.path) for c in crops]))
    for t, values in TRAITS.items():
        truth = np.array([values.index(c.traits[t]) for c in crops])
        majority = np.bincount(truth).max() / len(truth)
        if majority < 1:  # a trait the tiny world's people all share teaches nothing
            assert (read[t].argmax(1) == truth).mean() > majority, t
        assert np.allclose(read[t].sum(1), 1, atol=1e-5)
    described = reader.describe(Image.open(crops[0].path))
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
    images = [Image.open(c.path) for c in crops[:4]]
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
    odd = LabelledCrop(crops[0].path, {**crops[0].traits, "hair_colour": "green"})
    with pytest.raises(TraitError, match="vocabulary"):
        train_trait_reader([odd], TraitReaderConfig(epochs=1))
