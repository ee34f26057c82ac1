"""Best-choice evaluation: the model's confidence in each gallery index, read in one forward.

The stage-3 answer is ``"The best match is image {k}."``. The tokens before the index are the
same for every ``k``, so one forward over prompt + that prefix yields the next-token
distribution over the index tokens: its argmax is the model's choice and its probabilities are
the response confidences the retrieval service ranks by.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLForConditionalGeneration

from chatreid.data.instructions import InstructionSample
from chatreid.data.instructions.prompts import best_match_response
from chatreid.model import ChatReIDProcessor
from chatreid.model.identity import IdentityVision
from chatreid.tuning.collate import ImageLoader, encode_prompt, load_images
from chatreid.tuning.stages import StageRule


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


def index_probabilities(logits: torch.Tensor, index_ids: Sequence[int],
                        pointer: np.ndarray | None = None) -> np.ndarray:
    """Next-token logits → P(index = k), renormalised over the shown indices; ``pointer`` (one
    score per shown candidate, from the identity head) is added to the index logits first."""
    index_logits = logits.float()[list(index_ids)]
    if pointer is not None:
        index_logits = index_logits + torch.as_tensor(pointer, dtype=torch.float32,
                                                      device=index_logits.device)
    return torch.softmax(index_logits, dim=-1).double().cpu().numpy()


@torch.no_grad()
def score_answer(
    model: Qwen2VLForConditionalGeneration,
    enc: dict[str, torch.Tensor],
    tokens: ChoiceTokens,
    gallery_size: int,
    pointer: np.ndarray | None = None,
) -> np.ndarray:
    """One forward over an encoded prompt + the shared answer prefix; P(index = k), k ≤ size."""
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
    return index_probabilities(out.logits[0, -1], tokens.index_ids[:gallery_size], pointer)


def choice_probabilities(
    model: Qwen2VLForConditionalGeneration,
    processor: ChatReIDProcessor,
    sample: InstructionSample,
    load: ImageLoader,
    rule: StageRule,
    tokens: ChoiceTokens,
    identity: IdentityVision | None = None,
) -> np.ndarray:
    """P(index = k | prompt) for k = 1..gallery size, renormalised over the gallery (with the
    identity head's pointer term when the model has one and the query is an image)."""
    images = load_images(sample, load, rule)
    enc = encode_prompt(processor, sample.prompt, images)
    pointer = None
    kind = sample.task  # stage-3 task names are the query kinds the head scores
    if identity is not None and sample.meta.get("query_is_image") and identity.applies_to(kind):
        pointer = identity.scores(images[0], images[1:], kind)
    return score_answer(model, enc, tokens, gallery_size_of(sample), pointer)


def gallery_size_of(sample: InstructionSample) -> int:
    return len(sample.meta["gallery"])


def evaluate_best_choice(
    model: Qwen2VLForConditionalGeneration,
    processor: ChatReIDProcessor,
    samples: Sequence[InstructionSample],
    load: ImageLoader,
    rule: StageRule,
    identity: IdentityVision | None = None,
) -> dict[str, float]:
    """Rank-1 (overall and per task, each with its chance level), mean confidence in the
    truth; ``identity``: the model's identity head adds its pointer term, as when serving."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    task_chance: dict[str, list[float]] = defaultdict(list)
    truth_prob, chance = [], []
    tokens = choice_tokens(processor.tokenizer, max(map(gallery_size_of, samples), default=1))
    for sample in samples:
        size = gallery_size_of(sample)
        probs = choice_probabilities(model, processor, sample, load, rule, tokens, identity)
        truth = int(sample.answer["choice"])
        hits[sample.task].append(int(np.argmax(probs)) + 1 == truth)
        truth_prob.append(float(probs[truth - 1]))
        chance.append(1.0 / size)
        task_chance[sample.task].append(1.0 / size)
    model.train(was_training)
    all_hits = [h for task_hits in hits.values() for h in task_hits]
    out = {
        "rank1": float(np.mean(all_hits)) if all_hits else float("nan"),
        "truth_confidence": float(np.mean(truth_prob)) if truth_prob else float("nan"),
        "chance_rank1": float(np.mean(chance)) if chance else float("nan"),
        "eval_samples": float(len(all_hits)),
    }
    out.update({f"rank1/{task}": float(np.mean(h)) for task, h in sorted(hits.items())})
    out.update({f"chance_rank1/{t}": float(np.mean(c)) for t, c in sorted(task_chance.items())})
    return out
