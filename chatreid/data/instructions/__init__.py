"""Instruction data engine: the three ChatReID tuning stages built from an annotated world.

- stage 1 (attribute understanding): detailed captions composed from the attribute annotations;
- stage 2 (fine-grained retrieval): the seven image/text/attribute tasks, drawn from a task mix;
- stage 3 (Re-ID reasoning): best-choice retrieval over galleries with exactly one match.

Identity-only tasks (stage 2's image-image tasks, stage 3's standard Re-ID) can also draw real
people (``RealImages``, ``chatreid.data.instructions.real``); tasks that need attribute labels,
captions, outfits or modalities stay synthetic-only.

Every sample's ``response`` parses back to its ``answer`` with the stage's parser.
"""

from chatreid.data.instructions.prompts import ParseError
from chatreid.data.instructions.real import REAL_TASKS, RealImages
from chatreid.data.instructions.samples import (
    IMAGE_TOKEN,
    TRAIN_SPLITS,
    ImageEntry,
    InstructionSample,
    canonical_attributes,
    load_entries,
)
from chatreid.data.instructions.stage1 import CaptionFilter, build_stage1, parse_caption
from chatreid.data.instructions.stage2 import (
    STAGE2_MIX,
    Stage2Config,
    build_stage2,
    parse_stage2,
    sample_num_matches,
)
from chatreid.data.instructions.stage3 import STAGE3_MIX, Stage3Config, build_stage3, parse_stage3

__all__ = [
    "IMAGE_TOKEN",
    "REAL_TASKS",
    "STAGE2_MIX",
    "STAGE3_MIX",
    "TRAIN_SPLITS",
    "CaptionFilter",
    "ImageEntry",
    "InstructionSample",
    "ParseError",
    "RealImages",
    "Stage2Config",
    "Stage3Config",
    "build_stage1",
    "build_stage2",
    "build_stage3",
    "canonical_attributes",
    "load_entries",
    "parse_caption",
    "parse_stage2",
    "parse_stage3",
    "sample_num_matches",
]
