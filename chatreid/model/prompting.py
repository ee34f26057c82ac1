"""How the model is asked and how its best-choice answer is read: shared by training (the
tuning stages), evaluation and serving (the reranker), so it sits with the model, below them.

The prompt goes through the processor (which expands each image placeholder to its patch
tokens). The stage-3 answer is ``"The best match is image {k}."``; the tokens before the index
are the same for every ``k``, so one forward over prompt + that prefix yields the next-token
distribution over the index tokens: its argmax is the model's choice and its probabilities are
the response confidences the retrieval service ranks by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, Qwen2VLForConditionalGeneration

from chatreid.data.instructions.prompts import best_match_response
from chatreid.data.instructions.samples import IMAGE_TOKEN
from chatreid.model.processor import ChatReIDProcessor


def messages_for(prompt: str) -> list[dict[str, Any]]:
    """The user turn: text with ``<image>`` placeholders → Qwen2-VL content parts."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return [{"role": "user", "content": parts}]


def render_prompt(processor: ChatReIDProcessor, prompt: str) -> str:
    """The chat text the model trains and answers on: user turn + assistant header."""
    return processor.apply_chat_template(
        messages_for(prompt), add_generation_prompt=True, tokenize=False
    )


def encode_prompt(
    processor: ChatReIDProcessor, prompt: str, images: Sequence[Image.Image]
) -> dict[str, torch.Tensor]:
    """Processor output for the user turn plus the assistant header (batch of one)."""
    text = render_prompt(processor, prompt)
    # the processor takes flat kwargs that its Unpack[ProcessingKwargs] hint does not list
    return dict(processor(text=[text], images=list(images) or None, return_tensors="pt"))  # pyright: ignore[reportCallIssue]


@dataclass(frozen=True)
class ChoiceTokens:
    prefix: list[int]  # answer tokens shared by every index
    index_ids: list[int]  # next token for index 1, 2, ...


def choice_tokens(tokenizer: PreTrainedTokenizerBase, max_choice: int) -> ChoiceTokens:
    """Split the answer's token ids into the shared prefix and a distinct token per index."""
    seqs = [
        tokenizer(best_match_response(k), add_special_tokens=False)["input_ids"]
        for k in range(1, max_choice + 1)
    ]
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    index_ids = [s[n] for s in seqs]
    if len(set(index_ids)) != len(index_ids):
        raise ValueError(f"the tokenizer does not give indices 1..{max_choice} distinct tokens")
    return ChoiceTokens(seqs[0][:n], index_ids)


def index_logits(logits: torch.Tensor, index_ids: Sequence[int]) -> np.ndarray:
    """Next-token logits → the logits of the shown indices' tokens (float64)."""
    return logits.float()[list(index_ids)].double().cpu().numpy()


def choice_logits(model: Qwen2VLForConditionalGeneration, hidden: torch.Tensor,
                  index_ids: Sequence[int]) -> np.ndarray:
    """The decoder's last hidden state → the shown indices' logits, through only their rows of
    the LM head: the same numbers as ``index_logits`` of the full next-token logits, without
    reading the rest of the vocabulary's rows (on a CPU, about a tenth of a small forward)."""
    head = model.lm_head
    rows = torch.tensor(list(index_ids), device=hidden.device)
    bias = None if head.bias is None else head.bias[rows]
    logits = torch.nn.functional.linear(hidden, head.weight[rows], bias)
    return logits.float().double().cpu().numpy()


def answer_distribution(index_logit: np.ndarray, pointer: np.ndarray | None = None
                        ) -> np.ndarray:
    """P(index = k) over the shown indices: softmax of the decoder's index logits plus
    ``pointer`` (one score per shown candidate, from the identity head)."""
    z = index_logit if pointer is None else index_logit + np.asarray(pointer, np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


@torch.no_grad()
def answer_logits(
    model: Qwen2VLForConditionalGeneration,
    enc: dict[str, torch.Tensor],
    tokens: ChoiceTokens,
    gallery_size: int,
) -> np.ndarray:
    """One forward over an encoded prompt + the shared answer prefix; the index logits."""
    enc = {k: v.to(model.device) for k, v in enc.items()}
    answer = torch.tensor([tokens.prefix], dtype=torch.long, device=model.device)
    ids = torch.cat([enc["input_ids"], answer], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros_like(answer)], dim=1),
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        logits_to_keep=1,
    )
    return index_logits(out.logits[0, -1], tokens.index_ids[:gallery_size])
