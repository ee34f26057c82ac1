"""The rules of Hierarchical Progressive Tuning (paper, Sec. 3.2), one ``StageRule`` per stage.

* stage 1 (attribute understanding): encoder and decoder trained in full; crops smaller than
  256×128 are resized up to 256×128 so fine attributes survive patching;
* stage 2 (fine-grained retrieval): keeps stage 1's vision encoder, starts from a *fresh*
  pretrained decoder (captioning habits must not leak into retrieval answers); crops larger than
  384×192 are resized down so several images fit one context;
* stage 3 (Re-ID reasoning): inherits stage 2 whole, encoder frozen, native resolution.

The encoder is ``model.visual`` including its merger (the projector into the decoder's width).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from chatreid.model import ChatReIDProcessor, build_model

STAGES = (1, 2, 3)


@dataclass(frozen=True)
class StageRule:
    stage: int
    train_encoder: bool
    fresh_decoder: bool  # decoder re-loaded from the base model instead of the parent's
    min_size: tuple[int, int] | None  # (h, w): smaller crops are resized up to this
    max_size: tuple[int, int] | None  # (h, w): larger crops are resized down to this


RULES: dict[int, StageRule] = {
    1: StageRule(1, train_encoder=True, fresh_decoder=False, min_size=(256, 128), max_size=None),
    2: StageRule(2, train_encoder=True, fresh_decoder=True, min_size=None, max_size=(384, 192)),
    3: StageRule(3, train_encoder=False, fresh_decoder=False, min_size=None, max_size=None),
}


def rule_for(stage: int) -> StageRule:
    if stage not in RULES:
        raise ValueError(f"unknown HPT stage {stage}; stages are {STAGES}")
    return RULES[stage]


def resize_for(rule: StageRule, image: Image.Image) -> Image.Image:
    """Apply the stage's resolution rule to one crop (h×w as in the paper's 256×128)."""
    w, h = image.size
    if rule.min_size and (h < rule.min_size[0] or w < rule.min_size[1]):
        return image.resize((rule.min_size[1], rule.min_size[0]), Image.Resampling.BICUBIC)
    if rule.max_size and (h > rule.max_size[0] or w > rule.max_size[1]):
        return image.resize((rule.max_size[1], rule.max_size[0]), Image.Resampling.BICUBIC)
    return image


def encoder_parameters(model: Qwen2VLForConditionalGeneration) -> dict[str, object]:
    return dict(model.model.visual.named_parameters())


def prepare_stage_model(
    stage: int, base: str, parent: str | Path | None
) -> tuple[Qwen2VLForConditionalGeneration, ChatReIDProcessor]:
    """The model a stage starts from, with the stage's parameters frozen.

    ``parent`` is the previous stage's checkpoint directory; ``None`` starts from ``base`` (the
    ablations: stage 3 only, stages 2+3).
    """
    rule = rule_for(stage)
    if parent is None:
        model, processor = build_model(base)
    elif rule.fresh_decoder:
        model, processor = build_model(base)
        inherited, _ = build_model(str(parent))
        model.model.visual.load_state_dict(inherited.model.visual.state_dict())
        del inherited
    else:
        model, processor = build_model(str(parent))
    model.train()
    for p in model.model.visual.parameters():
        p.requires_grad_(rule.train_encoder)
    return model, processor
