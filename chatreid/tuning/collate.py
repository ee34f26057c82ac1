"""Instruction samples → model inputs, with the loss on response tokens only.

The prompt is encoded as the model is asked at serving time (``chatreid.model.prompting``);
the response is tokenized on its own and appended, so the boundary between "what the user
said" and "what the model must say" is exact rather than found by re-tokenizing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from chatreid.data.instructions import InstructionSample
from chatreid.model import ChatReIDProcessor
from chatreid.model.prompting import encode_prompt
from chatreid.tuning.stages import StageRule, resize_for

IGNORE = -100  # label of tokens the loss skips (prompt, image patches, padding)
END_OF_TURN = "<|im_end|>"

ImageLoader = Callable[[str], Image.Image]


def load_images(sample: InstructionSample, load: ImageLoader, rule: StageRule) -> list[Image.Image]:
    return [resize_for(rule, load(path).convert("RGB")) for path in sample.images]


def encode_sample(
    sample: InstructionSample,
    processor: ChatReIDProcessor,
    load: ImageLoader,
    rule: StageRule,
) -> dict[str, torch.Tensor]:
    """One training example: 1-D ids/labels/mask, plus the sample's image patches."""
    enc = encode_prompt(processor, sample.prompt, load_images(sample, load, rule))
    response = processor.tokenizer(sample.response + END_OF_TURN, add_special_tokens=False)
    response_ids = torch.tensor(response["input_ids"], dtype=torch.long)
    prompt_ids = enc["input_ids"][0]
    out = {
        "input_ids": torch.cat([prompt_ids, response_ids]),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE), response_ids]),
        "mm_token_type_ids": torch.cat(
            [enc["mm_token_type_ids"][0], torch.zeros_like(response_ids)]
        ),
    }
    if "pixel_values" in enc:
        out["pixel_values"] = enc["pixel_values"]
        out["image_grid_thw"] = enc["image_grid_thw"]
    return out


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into one batch; patches are concatenated."""
    length = max(len(x["input_ids"]) for x in batch)

    def pad(key: str, value: int) -> torch.Tensor:
        rows = [torch.nn.functional.pad(x[key], (0, length - len(x[key])), value=value)
                for x in batch]
        return torch.stack(rows)

    out = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE),
        "mm_token_type_ids": pad("mm_token_type_ids", 0),
        "attention_mask": torch.stack([
            (torch.arange(length) < len(x["input_ids"])).long() for x in batch
        ]),
    }
    with_images = [x for x in batch if "pixel_values" in x]
    if with_images:
        out["pixel_values"] = torch.cat([x["pixel_values"] for x in with_images])
        out["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in with_images])
    return out
