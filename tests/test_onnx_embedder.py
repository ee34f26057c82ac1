"""ONNX Re-ID backbones as the prefilter embedder: cards, checks, probe, checkpoints.

The two published models are read from ``../shared/weights`` at run time (never copied into
the project); the graphs that must be refused are built here with ``onnx.helper``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from chatreid.embedder import (
    CARD_FILE,
    ONNX_FILE,
    OnnxEmbedder,
    WeightsError,
    load_embedder,
    probe,
    write_onnx_checkpoint,
)
from chatreid.embedder.importer import prepare_onnx
from chatreid.embedder.onnx import probe_crops
from schemas.cards import EmbedderCard

from .conftest import SHARED

OSNET = SHARED / "weights" / "osnet_x0_25_msmt17.onnx"
OMZ = SHARED / "weights" / "person-reidentification-retail-0287.onnx"
needs_weights = pytest.mark.shared("weights/osnet_x0_25_msmt17.onnx",
                                   "weights/person-reidentification-retail-0287.onnx")


def osnet_card(**changes) -> EmbedderCard:
    fields = {"name": "osnet", "height": 256, "width": 128, "output_dim": 512}
    return EmbedderCard.preset("torchreid", **{**fields, **changes})


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def image_graph(nodes, output_shape, initializers=()) -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    return helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))


# -- the published models -------------------------------------------------------------------


@needs_weights
def test_osnet_loads_with_the_torchreid_convention_read_from_its_graph() -> None:
    emb = load_embedder(OSNET)
    card = emb.card
    assert (card.layout, card.channel_order, card.scale) == ("NCHW", "RGB", "unit")
    assert (card.height, card.width, card.output_dim, card.batch) == (256, 128, 512, None)
    assert emb.version.startswith("onnx-osnet_x0_25_msmt17-") and emb.version.endswith("@256x128")
    vectors = emb.embed(probe_crops())
    assert vectors.shape == (2, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


@needs_weights
@pytest.mark.shared("data/cuhk03-pair1")
def test_the_same_person_is_closer_than_another_person() -> None:
    """Real crops: one CUHK03 person's two camera views vs another person (a wrong card's
    preprocessing, e.g. BGR for RGB, lowers exactly this margin)."""
    val = SHARED / "data" / "cuhk03-pair1" / "val"
    a0, a1, b0 = (Image.open(val / n) for n in ("0000_00.jpg", "0000_05.jpg", "0001_00.jpg"))
    v = load_embedder(OSNET).embed([a0, a1, b0])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


@needs_weights
def test_an_nhwc_bgr_model_needs_its_card_and_a_fixed_batch_is_fed_one_by_one() -> None:
    with pytest.raises(WeightsError, match=r"NHWC input.*--card"):
        load_embedder(OMZ)  # the default torchreid convention does not fit: refused, not guessed
    emb = load_embedder(OMZ, card="openvino")
    assert (emb.card.layout, emb.card.channel_order, emb.card.scale, emb.card.batch) == (
        "NHWC", "BGR", "raw", 1)
    crops = [*probe_crops(), probe_crops()[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    together = emb.embed(crops)
    one_by_one = np.concatenate([emb.embed([c]) for c in crops])
    assert together.shape == (3, 256)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


@needs_weights
@pytest.mark.parametrize(("change", "named"), [
    ({"layout": "NHWC"}, "layout NHWC"),
    ({"output_dim": 256}, "output_dim 256"),
    ({"height": 384}, "input size 384x128"),
    ({"input_name": "pixels"}, "input 'pixels'"),
])
def test_a_card_that_does_not_match_the_graph_is_refused(change: dict, named: str) -> None:
    with pytest.raises(WeightsError, match=f"card does not match the graph.*{named}"):
        OnnxEmbedder(OSNET, osnet_card(**change))


@needs_weights
def test_a_card_without_the_graphs_fixed_batch_is_refused() -> None:
    card = EmbedderCard.preset("openvino", name="omz", height=256, width=128, output_dim=256)
    with pytest.raises(WeightsError, match=r"batch None .*fixed at 1"):
        OnnxEmbedder(OMZ, card)


@needs_weights
def test_a_card_file_is_validated_and_names_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "card.json"
    bad.write_text(json.dumps({**osnet_card().model_dump(mode="json"), "scale": "percent"}))
    with pytest.raises(WeightsError, match=r"(?s)not a valid embedder card.*scale"):
        load_embedder(OSNET, card=bad)
    with pytest.raises(WeightsError, match="card not found"):
        load_embedder(OSNET, card=tmp_path / "missing.json")


# -- files that are not Re-ID embedders -------------------------------------------------------


@needs_weights
def test_a_truncated_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(OSNET.read_bytes()[: OSNET.stat().st_size // 3])
    with pytest.raises(WeightsError, match=r"cannot load ONNX model .*cut.onnx.*truncated"):
        load_embedder(cut)
    with pytest.raises(WeightsError, match="ONNX model not found"):
        load_embedder(tmp_path / "absent.onnx")


def test_a_graph_without_an_image_input_is_refused(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [10, 4], np.ones(40, np.float32))
    path = save(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                  initializer=[w]), tmp_path / "tabular.onnx")
    with pytest.raises(WeightsError, match=r"rank 2.*rank-4"):
        load_embedder(path)


def test_a_graph_that_returns_maps_not_vectors_is_refused(tmp_path: Path) -> None:
    path = save(image_graph([helper.make_node("Relu", ["x"], ["y"])], ["n", 3, 64, 32]),
                tmp_path / "segmenter.onnx")
    with pytest.raises(WeightsError, match=r"one vector per image, \(batch, dim\)"):
        load_embedder(path)


def test_a_graph_whose_output_ignores_the_image_fails_the_probe(tmp_path: Path) -> None:
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [1, 3, 1, 1], [1.0, 2.0, 3.0])
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Mul", ["p", "zero"], ["z"])]
    dead = save(image_graph([*nodes, helper.make_node("Identity", ["z"], ["y"])],
                            ["n", 3, 1, 1], [zero]), tmp_path / "dead.onnx")
    with pytest.raises(WeightsError, match="all-zero"):
        probe(load_embedder(dead))
    constant = save(image_graph([*nodes, helper.make_node("Add", ["z", "bias"], ["y"])],
                                ["n", 3, 1, 1], [zero, bias]), tmp_path / "constant.onnx")
    with pytest.raises(WeightsError, match="same vector for two different crops"):
        prepare_onnx(constant, tmp_path / "out")


# -- checkpoints ------------------------------------------------------------------------------


@needs_weights
def test_a_checkpoint_directory_loads_back_to_the_same_vectors(tmp_path: Path) -> None:
    direct = load_embedder(OMZ, card="openvino")
    out = write_onnx_checkpoint(OMZ, direct.card, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == [CARD_FILE, ONNX_FILE]
    loaded = load_embedder(out)
    assert loaded.version == direct.version
    crops = probe_crops()
    np.testing.assert_array_equal(loaded.embed(crops), direct.embed(crops))
    with pytest.raises(WeightsError, match="card does not match the graph"):
        write_onnx_checkpoint(OSNET, direct.card, tmp_path / "wrong")  # OMZ's card, OSNet graph


# -- the running service rolls an imported model out -------------------------------------------


@needs_weights
@pytest.mark.stack
def test_an_imported_model_is_rolled_out_by_the_running_service_at_its_own_dim(settings,
                                                                                 world):
    from chatreid.embedder.importer import import_onnx
    from chatreid.prefilter.search import PrefilterSearch
    from schemas import DEPLOYMENTS, DeploymentEvent

    from .conftest import read_events
    from .test_embedder_training import Running, ingest, searchable, wait_for

    settings.gate.synthetic_root = world  # the gate validates on held-out synthetic people
    crops = ingest(settings, 16, seed=7)
    running = Running(settings)  # ImageNet MobileNetV2, 1280-d
    try:
        reader = PrefilterSearch(settings)
        wait_for(searchable(reader, 16))
        old = reader.version
        query = reader.crop_image(crops[3].crop_id)
        event = import_onnx(settings, OSNET)  # what `chatreid embedder import` runs
        assert event.version.startswith("onnx-osnet_x0_25_msmt17-")
        while reader.version != event.version:  # answers keep coming during the rebuild
            reader.refresh(timeout_s=30)
            assert reader.search(query, k=1)[0].crop_id == crops[3].crop_id
        version, store = reader.index.active()
        assert (version, store.dim) == (event.version, 512) and old != version
        assert store.crop_ids() == {c.crop_id for c in crops}  # nothing lost, none twice
        wait_for(lambda: running.node.service.versions == [event.version])
        later = ingest(settings, 4, seed=8)  # new crops are embedded by the imported model
        wait_for(searchable(reader, 20))
        top = reader.search(reader.crop_image(later[0].crop_id), k=1)[0]
        assert top.crop_id == later[0].crop_id and top.score > 0.999
    finally:
        running.stop()
    # the gate passed it, with both sides' figures on the deployment events
    steps = read_events(settings, DEPLOYMENTS, DeploymentEvent, 2)
    assert [(e.model, e.status, e.version) for e in steps] == [
        ("embedder", "started", event.version), ("embedder", "completed", event.version)]
    assert steps[0].candidate["gate/mAP"] >= steps[0].serving["gate/mAP"] > 0
