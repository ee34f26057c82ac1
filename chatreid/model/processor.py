"""Qwen2-VL processor that works without torchvision, plus the tokenizers it is built from.

transformers 5.x type-checks Qwen2-VL's video processor against a torchvision-backed class, and
torchvision does not import beside the CPU torch wheel. ChatReID only feeds still person crops,
so the processor drops the video half and uses the PIL image processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.tokenization_utils_tokenizers import TokenizersBackend

# Qwen2-VL's vision tokens, in the order of its official ids (151652..151656).
VISION_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2-VL message format: content is a string or a list of {"type": "image"} / {"type": "text"}
# parts; each image becomes one placeholder that the processor expands to its patch count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Files written by ChatReIDProcessor.save_pretrained besides the tokenizer's own.
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Deterministic training text for the tiny tokenizer: Re-ID dialogue vocabulary.
_TINY_CORPUS = (
    "Is the person in the first image the same person as in the second image? Yes. No.",
    "Which of the candidates shows the same person as the query? Answer with the index.",
    "The person wears a red jacket, blue jeans, white shoes and carries a black backpack.",
    "A woman in a long dress walks past the camera; a man with a cap rides a bicycle.",
    "Describe the clothing, hair, bag and shoes of the pedestrian in the picture.",
    "camera 1 camera 2 camera 3 candidate 0 1 2 3 4 5 6 7 8 9 query gallery match",
    "You are a helpful assistant for person re-identification across cameras.",
    "system user assistant",
)


def tiny_tokenizer(vocab_size: int = 1024) -> TokenizersBackend:
    """A small byte-level BPE trained in code on a fixed corpus (same vocabulary every call)."""
    specials = [*CHAT_TOKENS, *VISION_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CORPUS) * 4, trainer=trainer)
    return TokenizersBackend(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def add_vision_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a text tokenizer Qwen2-VL's vision tokens (as unsplittable specials) and chat format."""
    missing = [t for t in VISION_TOKENS if t not in tokenizer.get_vocab()]
    # transformers hints its fallback AddedToken class, not the tokenizers one it uses
    tokenizer.add_tokens([AddedToken(t, special=True) for t in missing], special_tokens=True)  # pyright: ignore[reportArgumentType]
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor_for(
    patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image preprocessing matching a vision tower's patching."""
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size
    )


class ChatReIDProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only.

    ``video_processor`` is kept in the signature for drop-in use but must be None; leaving it out
    of ``get_attributes`` (it is not a named parameter here) stops the torchvision type check.
    """

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("video_processor", None) is not None:
            raise ValueError("ChatReIDProcessor handles images only; pass video_processor=None")
        if tokenizer is None or image_processor is None:
            raise ValueError("ChatReIDProcessor needs both an image_processor and a tokenizer")
        super().__init__(
            image_processor, tokenizer, chat_template=chat_template or tokenizer.chat_template
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> list[str]:
        """Tokenizer files, the image-processor config and the chat template, each on its own."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        files = [str(f) for f in self.tokenizer.save_pretrained(out)]
        files += self.image_processor.save_pretrained(out)
        template = self.chat_template or ""
        if not isinstance(template, str):  # transformers also allows a dict of named templates
            raise TypeError("ChatReIDProcessor saves a single chat template")
        (out / CHAT_TEMPLATE_FILE).write_text(template)
        return sorted({*files, str(out / CHAT_TEMPLATE_FILE)})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """Load what save_pretrained wrote, or a hub/local Qwen2-VL checkpoint's processor files."""
        src = str(pretrained_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(src, **kwargs)
        template_path = Path(src) / CHAT_TEMPLATE_FILE
        chat_template = template_path.read_text() if template_path.is_file() else None
        return cls(image_processor, tokenizer, chat_template=chat_template)
