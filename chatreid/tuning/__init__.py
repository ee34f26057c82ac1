"""Training ChatReID's models: the VLM's HPT stages (torchreid's "engine") and the prefilter
embedder's metric learning. Sits above evaluation (the embedder's training scores itself with
the evaluation engine) and rerank (the identity head trains per query kind).

- ``stages``: the three HPT stage rules and the model each stage starts from;
- ``collate``: instruction samples → model inputs, loss on response tokens only;
- ``hpt``: the per-worker training loop Ray Train runs (DDP on CPU, DeepSpeed on GPU);
- ``evaluate``: best-choice rank-1 and response confidences;
- ``embedder_training``: the prefilter embedder's metric learning on Ray Train.

How a prompt is encoded and a best-choice answer read is the model's own
(``chatreid.model.prompting``), shared with the reranker.
"""

from chatreid.tuning.collate import IGNORE, collate, encode_sample
from chatreid.tuning.evaluate import choice_probabilities, evaluate_best_choice
from chatreid.tuning.hpt import HPTConfig, StageTrainer, deepspeed_config
from chatreid.tuning.stages import RULES, StageRule, prepare_stage_model, resize_for, rule_for

__all__ = [
    "IGNORE",
    "RULES",
    "HPTConfig",
    "StageRule",
    "StageTrainer",
    "choice_probabilities",
    "collate",
    "deepspeed_config",
    "encode_sample",
    "evaluate_best_choice",
    "prepare_stage_model",
    "resize_for",
    "rule_for",
]
