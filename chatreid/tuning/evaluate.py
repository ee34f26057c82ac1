"""Best-choice evaluation: the model's confidence in each gallery index, read in one forward
(how the answer is read: ``chatreid.model.prompting``), and rank-1 over instruction samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from transformers import Qwen2VLForConditionalGeneration

from chatreid.data.instructions import InstructionSample
from chatreid.model import ChatReIDProcessor
from chatreid.model.identity import IdentityVision
from chatreid.model.prompting import (
    ChoiceTokens,
    answer_distribution,
    answer_logits,
    choice_tokens,
    encode_prompt,
)
from chatreid.tuning.collate import ImageLoader, load_images
from chatreid.tuning.stages import StageRule


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
    identity head's pointer term when the model has one and it applies: an image query of a
    kind it scores, a clue (``meta["clue"]``, datasets since format 2) of a kind it weighs)."""
    images = load_images(sample, load, rule)
    enc = encode_prompt(processor, sample.prompt, images)
    logits = answer_logits(model, enc, tokens, gallery_size_of(sample))
    if identity is None:
        return answer_distribution(logits)
    has_image = bool(sample.meta.get("query_is_image"))
    # stage-3 task names are query kinds (``QueryKind.parse`` reads "attribute_query")
    terms = identity.pointer_terms(sample.task, images[0] if has_image else None,
                                   sample.meta.get("clue"), images[1:] if has_image else images)
    if terms is None:
        return answer_distribution(logits)
    # as a served first turn weighs them (``chatreid.rerank.judge``)
    return answer_distribution(identity.decoder_weight * logits, terms[0])


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
