"""Training and evaluation engine for the ChatReID VLM (torchreid's "engine", for HPT).

- ``stages``: the three HPT stage rules and the model each stage starts from;
- ``collate``: instruction samples → model inputs, loss on response tokens only;
- ``hpt``: the per-worker training loop Ray Train runs (DDP on CPU, DeepSpeed on GPU);
- ``evaluate``: best-choice rank-1 and response confidences.
"""

from chatreid.tuning.collate import IGNORE, collate, encode_sample, messages_for
from chatreid.tuning.evaluate import choice_probabilities, choice_tokens, evaluate_best_choice
from chatreid.tuning.hpt import HPTConfig, StageTrainer, deepspeed_config
from chatreid.tuning.stages import RULES, StageRule, prepare_stage_model, resize_for, rule_for

__all__ = [
    "IGNORE",
    "RULES",
    "HPTConfig",
    "StageRule",
    "StageTrainer",
    "choice_probabilities",
    "choice_tokens",
    "collate",
    "deepspeed_config",
    "encode_sample",
    "evaluate_best_choice",
    "messages_for",
    "prepare_stage_model",
    "resize_for",
    "rule_for",
]
