"""The model builder: tiny model, processor, checkpoint round trip, SmolLM2 transplant (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from chatreid.model import (
    VISION_TOKENS,
    ChatReIDProcessor,
    CheckpointError,
    VisionSpec,
    build_model,
    save_checkpoint,
)
from chatreid.model.processor import tiny_tokenizer

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Is this the query person?"}],
    },
    {"role": "assistant", "content": "Yes."},
]


def crop(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    """A 128x64 (height x width) person crop."""
    return Image.new("RGB", (64, 128), color)


def batch(processor: ChatReIDProcessor) -> dict[str, torch.Tensor]:
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    return processor(images=[crop()], text=[text], return_tensors="pt")


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


def test_tiny_config_matches_its_tokenizer(tiny) -> None:
    model, processor = tiny
    cfg, tok = model.config, processor.tokenizer
    assert cfg.text_config.vocab_size == len(tok)
    assert (
        cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    )
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.vision_config.hidden_size == cfg.text_config.hidden_size
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_tiny_build_is_deterministic(tiny) -> None:
    model, _ = tiny
    again, _ = build_model("tiny")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert tiny_tokenizer().get_vocab() == tiny_tokenizer().get_vocab()


def test_processor_expands_crop_into_image_tokens(tiny) -> None:
    _, processor = tiny
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    assert text.startswith("<|im_start|>user\n") and text.endswith("Yes.<|im_end|>\n")
    out = batch(processor)
    # 128x64 resizes to 140x56 (multiples of patch 14 x merge 2): a 10x4 patch grid, merged 2x2.
    assert out["image_grid_thw"].tolist() == [[1, 10, 4]]
    assert out["pixel_values"].shape == (40, 3 * 2 * 14 * 14)
    assert (out["input_ids"] == processor.image_token_id).sum().item() == 10


def test_image_text_forward_and_loss(tiny) -> None:
    model, processor = tiny
    inputs = batch(processor)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    seq = inputs["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)


def test_checkpoint_round_trip_gives_identical_logits(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    save_checkpoint(model, processor, tmp_path)
    loaded, loaded_processor = build_model(str(tmp_path))
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded_processor.chat_template == processor.chat_template
    inputs, again = batch(processor), batch(loaded_processor)
    for key in inputs:
        assert torch.equal(inputs[key], again[key]), key
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)


def test_dtype_and_vision_spec_apply() -> None:
    model, processor = build_model(
        "tiny", dtype=torch.bfloat16, vision=VisionSpec(depth=1, embed_dim=32, num_heads=2)
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.model.visual.blocks) == 1
    assert processor.image_processor.merge_size == model.config.vision_config.spatial_merge_size


def test_non_checkpoint_directory_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError) as err:
        build_model(str(tmp_path))
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors"):
        assert name in str(err.value)


def test_wrong_model_type_and_missing_path_are_rejected(tiny, tmp_path: Path) -> None:
    save_checkpoint(*tiny, tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"qwen2_vl"', '"llama"'))
    with pytest.raises(CheckpointError, match="model_type"):
        build_model(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        build_model(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="vision"):
        build_model(str(tmp_path), vision=VisionSpec())


def test_processor_refuses_a_video_processor(tiny) -> None:
    _, processor = tiny
    with pytest.raises(ValueError, match="images only"):
        ChatReIDProcessor(processor.image_processor, processor.tokenizer, video_processor=object())


@pytest.mark.slow
def test_offline_default_text_logits_match_smollm2() -> None:
    from chatreid.model.builder import load_smollm2

    model, processor = build_model("offline-default")
    llm, tokenizer = load_smollm2()
    assert all(
        processor.tokenizer.convert_tokens_to_ids(t) >= len(tokenizer) for t in VISION_TOKENS
    )
    prompt = [{"role": "user", "content": "Describe the person in a red jacket."}]
    text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, llm(input_ids=ids).logits
    assert ours.shape[-1] == len(tokenizer) + len(VISION_TOKENS)
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, atol=1e-4, rtol=0)
