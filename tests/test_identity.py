"""The VLM's identity head: its scores, training, files, feature cache and place in each turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.embedder.load import load_embedder
from chatreid.model import build_model
from chatreid.model.identity import (
    FeatureCache,
    IdentityConfig,
    IdentityError,
    IdentityHead,
    IdentityVision,
)
from chatreid.rerank import BestChoiceReranker, Candidate, Query
from chatreid.tuning.identity import (
    Group,
    HeadRecipe,
    head_accuracy,
    split_by_person,
    train_identity_head,
)


@pytest.fixture(scope="module")
def backbone():
    return load_embedder(None, height=64, width=32)  # the pip-installed ImageNet MobileNetV2


def crop(rgb: tuple[int, int, int], stripe: tuple[int, int, int] | None = None) -> Image.Image:
    im = Image.new("RGB", (32, 64), rgb)
    if stripe:
        im.paste(stripe, (0, 20, 32, 44))
    return im


def test_untrained_head_scores_are_scaled_cosines():
    head = IdentityHead(IdentityConfig(feature_dim=8, encoder_version="v"))
    q, c = torch.randn(2, 8), torch.randn(2, 5, 8)
    cos = torch.nn.functional.cosine_similarity(q[:, None], c, dim=-1)
    assert torch.allclose(head(q, c, torch.tensor([0, 1])), 10 * cos, atol=1e-5)



def test_a_head_saved_with_the_old_kind_name_scores_multimodal_queries():
    """Heads and stage-3 samples from before the rename say "adaptive" for "multimodal"."""
    old = IdentityConfig(feature_dim=8, encoder_version="v",
                         kinds=["standard", "cloth_changing", "visible_infrared", "adaptive"])
    head = IdentityHead(old)
    assert old.kinds[-1] == "multimodal"
    assert head.kind_index("multimodal") == head.kind_index("adaptive") == 3
    with pytest.raises(IdentityError):
        head.kind_index("text_to_image")

def _clothes_world(n_people: int, seed: int) -> tuple[list[Group], dict[str, np.ndarray]]:
    """Features = 4 identity dims + 12 clothing dims; cloth-changing galleries show the person
    in other clothes, while the impostors wear the query's clothes."""
    rng = np.random.default_rng(seed)
    ident = rng.normal(size=(n_people, 4))
    feats, groups = {}, []
    for p in range(n_people):
        clothes = rng.normal(size=12) * 1.5
        feats[f"{seed}/{p}/q"] = np.r_[ident[p], clothes].astype(np.float32)
        feats[f"{seed}/{p}/pos"] = np.r_[ident[p] + rng.normal(size=4) * 0.2,
                                         rng.normal(size=12) * 1.5].astype(np.float32)
        cands = [f"{seed}/{p}/pos"]
        for j in range(5):
            other = rng.integers(n_people - 1)
            other += other >= p
            key = f"{seed}/{p}/neg{j}"
            feats[key] = np.r_[ident[other], clothes + rng.normal(size=12) * 0.2].astype(np.float32)
            cands.append(key)
        order = rng.permutation(len(cands))
        shown = tuple(cands[i] for i in order)
        groups.append(Group("cloth_changing", f"{seed}/{p}/q", shown,
                            shown.index(f"{seed}/{p}/pos"), p))
    return groups, feats


def test_training_learns_the_cloth_changing_metric_on_people_it_never_saw():
    train, f_train = _clothes_world(300, seed=1)
    held, f_held = _clothes_world(100, seed=2)
    head = train_identity_head(train, f_train, held[:50], f_held, "v",
                               HeadRecipe(epochs=30), progress=False)
    test = head_accuracy(head, held[50:], f_held)
    assert test["cosine_rank1"] < 0.3  # the impostors' clothes fool the plain cosine
    assert test["rank1"] > 0.8
    assert head.cfg.metrics["eval/rank1"] > head.cfg.metrics["eval/rank1_untrained"]


def test_validation_split_holds_out_whole_people():
    groups = [Group("standard", f"q{i}", ("a", "b"), 0, pid=i % 10) for i in range(50)]
    train, val = split_by_person(groups, share=0.2)
    assert {g.pid for g in train}.isdisjoint({g.pid for g in val})
    assert len({g.pid for g in val}) == 2 and len(train) + len(val) == 50


def test_feature_cache_computes_once_and_refuses_another_backbone(tmp_path, backbone):
    images = {"red": crop((200, 30, 30)), "blue": crop((30, 30, 200))}
    cache = FeatureCache(tmp_path, backbone.version)
    first = cache.get(["red", "blue", "red"], images.__getitem__, backbone)
    assert cache.computed == 2 and first.shape == (3, backbone.dim)
    again = FeatureCache(tmp_path, backbone.version)  # a new process reads the file
    assert len(again) == 2
    np.testing.assert_array_equal(again.get(["blue"], images.__getitem__, backbone), first[1:2])
    assert again.computed == 0
    cache.path.rename(tmp_path / "other.npz")
    with pytest.raises(IdentityError, match="refusing to mix"):
        FeatureCache(tmp_path, "other")  # a file written for another version, under its name


def test_a_head_for_another_backbone_is_refused(backbone):
    head = IdentityHead(IdentityConfig(feature_dim=backbone.dim, encoder_version="someone-else"))
    with pytest.raises(IdentityError, match="trained on backbone someone-else"):
        IdentityVision(backbone, head)


def test_identity_folder_round_trip(tmp_path, backbone):
    head = IdentityHead(IdentityConfig(feature_dim=backbone.dim, encoder_version=backbone.version))
    with torch.no_grad():
        head.metric.mul_(torch.rand_like(head.metric))
    vision = IdentityVision(backbone, head)
    vision.save(tmp_path)
    loaded = IdentityVision.load(tmp_path)
    assert loaded is not None and loaded.version == backbone.version
    cands = [crop((200, 30, 30)), crop((30, 200, 30))]
    np.testing.assert_allclose(loaded.scores(crop((190, 40, 40)), cands, "standard"),
                               vision.scores(crop((190, 40, 40)), cands, "standard"), rtol=1e-5)
    assert IdentityVision.load(tmp_path / "nothing-here") is None
    (tmp_path / "identity" / "head.safetensors").unlink()
    with pytest.raises(IdentityError, match=r"lacks head\.safetensors"):
        IdentityVision.load(tmp_path)


def test_each_turn_adds_the_pointer_term(backbone):
    """The same tiny decoder, with and without the head: the head's view of who matches
    decides the dialogue's first pick, and only for image queries of kinds it scores."""
    model, processor = build_model("tiny")
    query = crop((200, 30, 30), (240, 240, 240))
    shown = [crop((30, 30, 200)), crop((30, 160, 30)), crop((205, 35, 30), (235, 235, 235)),
             crop((120, 120, 120))]
    head = IdentityHead(IdentityConfig(feature_dim=backbone.dim,
                                       encoder_version=backbone.version))
    with torch.no_grad():
        # a confident head: its pointer term outweighs the decoder
        head.log_scale.fill_(float(np.log(200.0)))
    identity = IdentityVision(backbone, head)
    assert int(np.argmax(identity.scores(query, shown, "standard"))) == 2
    cands = [Candidate(str(i), im) for i, im in enumerate(shown)]
    with_head = BestChoiceReranker(model, processor, identity=identity)
    result = with_head.rerank(Query("standard", image=query), cands)
    assert result.turns[0].chosen == "2" and result.turns[0].probability > 0.9
    plain = BestChoiceReranker(model, processor)
    assert plain.rerank(Query("standard", image=query), cands).turns[0].probability < 0.9
    text_query = Query("text_to_image", text="a person in a red jacket")
    assert with_head.rerank(text_query, cands).turns[0].probability < 0.9


def test_the_head_learns_to_outweigh_a_noisy_decoder():
    """Trained on the answer distribution a turn uses (decoder logits + head), the head grows
    its scale until a decoder that guesses no longer drowns what the features show."""
    rng = np.random.default_rng(3)

    def world(n: int, seed: int) -> tuple[list[Group], dict[str, np.ndarray]]:
        r = np.random.default_rng(seed)
        feats, groups = {}, []
        for p in range(n):
            me = r.normal(size=16)
            feats[f"{seed}/{p}/q"] = me.astype(np.float32)
            feats[f"{seed}/{p}/0"] = (me + r.normal(size=16) * 0.8).astype(np.float32)
            for j in range(1, 6):
                feats[f"{seed}/{p}/{j}"] = r.normal(size=16).astype(np.float32)
            noise = tuple(float(x) for x in rng.normal(size=6) * 4.0)  # a guessing decoder
            groups.append(Group("standard", f"{seed}/{p}/q",
                                tuple(f"{seed}/{p}/{j}" for j in range(6)), 0, p, noise))
        return groups, feats

    train, f_train = world(300, 1)
    held, f_held = world(120, 2)
    untrained = IdentityHead(IdentityConfig(feature_dim=16, encoder_version="v"))
    before = head_accuracy(untrained, held, f_held)
    head = train_identity_head(train, f_train, held[:60], f_held, "v", HeadRecipe(epochs=30),
                               progress=False)
    after = head_accuracy(head, held[60:], f_held)
    assert before["decoder_rank1"] < 0.4 and before["rank1"] < before["cosine_rank1"]
    before_test = head_accuracy(untrained, held[60:], f_held)
    assert after["rank1"] > before_test["rank1"] + 0.1  # it learned not to trust the decoder
    assert after["rank1"] >= after["cosine_rank1"] - 0.1
