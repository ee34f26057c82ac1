"""Frozen-encoder stages train on cached vision outputs: same loss, one encoder pass per crop,
and never another encoder's features."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chatreid.data.instructions import InstructionSample
from chatreid.model import build_model
from chatreid.tuning.collate import collate, encode_sample
from chatreid.tuning.hpt import VisionCache
from chatreid.tuning.stages import rule_for

IMAGES = {"a.png": Image.new("RGB", (48, 96), (200, 40, 40)),
          "b.png": Image.new("RGB", (40, 80), (40, 40, 200))}


def sample() -> InstructionSample:
    return InstructionSample(
        task="standard", stage=3, images=["a.png", "b.png"],
        prompt="Given the <image> provided, which of these?\nImage 1: <image>",
        response="The best match is image 1.", answer={"choice": 1},
        meta={"gallery": [{}], "query_is_image": True})


def test_cached_vision_gives_the_same_loss_with_one_encoder_pass_per_crop():
    model, processor = build_model("tiny")
    model.eval()
    enc = encode_sample(sample(), processor, IMAGES.__getitem__, rule_for(3))
    batch = collate([enc], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss
    cache = VisionCache(model)
    keys = list(IMAGES)
    for _ in range(3):
        feats = cache.features(model, keys, enc["pixel_values"], enc["image_grid_thw"])
        inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
        with torch.no_grad():
            loss = model(**inputs, mm_encoder_outputs={"image": _pooled(feats)}).loss
        torch.testing.assert_close(loss, reference)
    assert (cache.misses, cache.hits) == (2, 4)


def test_features_of_another_encoder_are_refused():
    model, _ = build_model("tiny")
    cache = VisionCache(model)
    cache.check(model)
    with torch.no_grad():
        next(model.model.visual.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="refusing to mix"):
        cache.check(model)


def _pooled(feats):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=tuple(feats))
