"""Prompt texts (the paper's wording where it gives one) and the fixed response forms, each with
the parser that turns a response back into its answer dict."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from chatreid.data.instructions.samples import ATTRIBUTE_LABELS, IMAGE_TOKEN, LABEL_TO_FIELD

# Stage 1 -------------------------------------------------------------------------------------
CAPTION_PROMPT = (
    "In the <image> provided, can you give a detailed description of the pedestrian, including "
    "their gender, age range, hair, type and color of clothing, footwear type and color, posture "
    "or gait, any patterns or accessories, and any distinguishing features?"
)

# Stage 2 (Figure 4) --------------------------------------------------------------------------
II_ONE_TO_ONE_PROMPT = "Do these two images <image> <image> contain the same pedestrian identity?"
II_MANY_TO_MANY_PROMPT = (
    "Given the query image <image> of a pedestrian and a gallery set\n{gallery}\nPlease select "
    "all images from gallery set, that match the identity of the pedestrian in the query image."
)
TI_ONE_TO_ONE_PROMPT = (
    'Does the image <image> of the pedestrian match the following caption: "{caption}"'
)
TI_MANY_TO_ONE_PROMPT = (
    "Given the following image <image>, which of the captions accurately describes it?\n"
    "{captions}"
)
TI_ONE_TO_MANY_PROMPT = (
    "Select the image that best matches the following description of the pedestrian's "
    "appearance: {caption}\n{gallery}"
)
ATTR_COMMON_UNIQUE_PROMPT = (
    "Given the first image <image> and the second image <image>, please describe the "
    "similarities and differences between them. Focus on the attributes of the pedestrians in "
    "each image."
)
ATTR_PREDICTION_PROMPT = (
    "Examine the image <image> below and select the correct attribute annotations for the "
    "pedestrian."
)

# Stage 3 -------------------------------------------------------------------------------------
STANDARD_PROMPT = (
    "Given the <image> provided, identify which of the following images show the same pedestrian "
    "as in the first image.\n{gallery}"
)
CLOTH_CHANGING_PROMPT = (
    "Given the <image> provided, select which of the following images shows the same person, "
    "who may be wearing different clothing.\n{gallery}"
)
VISIBLE_INFRARED_PROMPT = (
    "Using the given <image>, choose the corresponding image from the following images that "
    "matches the same pedestrian, considering both infrared and visible light images for "
    "reidentification.\n{gallery}"
)
TEXT_TO_IMAGE_PROMPT = (
    "Select the image that best matches the following description of the pedestrian's "
    "appearance: {text}\n{gallery}"
)
ATTRIBUTE_QUERY_PROMPT = (
    "Select the image of the pedestrian with the following attributes: {text}.\n{gallery}"
)
MULTIMODAL_PROMPT = (  # the paper's adaptive multi-modal retrieval
    'Given the <image> provided and the additional clue "{text}", select which of the '
    "following images shows the same pedestrian.\n{gallery}"
)

ORDINALS = (
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
)


class ParseError(ValueError):
    """A response does not have the expected form."""


def gallery_block(n: int) -> str:
    """The candidate list: ``Image 1: <image>`` one per line."""
    return "\n".join(f"Image {i}: {IMAGE_TOKEN}" for i in range(1, n + 1))


def caption_block(captions: Sequence[str]) -> str:
    """The paper's form: ``The first caption: "..."``, one per line."""
    return "\n".join(f'The {ORDINALS[i]} caption: "{c}"' for i, c in enumerate(captions))


def _match(pattern: str, response: str) -> re.Match[str]:
    m = re.fullmatch(pattern, response.strip(), flags=re.DOTALL)
    if m is None:
        raise ParseError(f"unexpected response form: {response!r}")
    return m


# Yes / No ------------------------------------------------------------------------------------
def yes_no(match: bool, yes: str, no: str) -> str:
    return f"Yes, {yes}." if match else f"No, {no}."


def parse_yes_no(response: str) -> dict[str, bool]:
    return {"match": _match(r"(Yes|No)\b.*", response).group(1) == "Yes"}


# Indices -------------------------------------------------------------------------------------
def many_to_many_response(indices: Sequence[int]) -> str:
    listed = ", ".join(str(i) for i in indices)
    return f"These images {listed} match the identity of the pedestrian in the query image."


def parse_many_to_many(response: str) -> dict[str, list[int]]:
    m = _match(
        r"These images ([\d, ]+) match the identity of the pedestrian in the query image\.",
        response,
    )
    return {"indices": [int(t) for t in m.group(1).split(",")]}


def ordinal_caption_response(choice: int) -> str:
    return f"The {ORDINALS[choice - 1]} caption."


def parse_ordinal_caption(response: str) -> dict[str, int]:
    word = _match(r"The (\w+) caption\.", response).group(1)
    if word not in ORDINALS:
        raise ParseError(f"unknown ordinal {word!r}")
    return {"choice": ORDINALS.index(word) + 1}


def description_match_response(choice: int) -> str:
    return f"This image {choice} matches the following description."


def parse_description_match(response: str) -> dict[str, int]:
    return {
        "choice": int(
            _match(r"This image (\d+) matches the following description\.", response).group(1)
        )
    }


def best_match_response(choice: int) -> str:
    return f"The best match is image {choice}."


def parse_best_match(response: str) -> dict[str, int]:
    return {"choice": int(_match(r"The best match is image (\d+)\.", response).group(1))}


# Attribute lists -----------------------------------------------------------------------------
def attribute_list(attrs: Mapping[str, str]) -> str:
    """``label: value; label: value`` in the canonical field order (``none`` when empty)."""
    keys = [k for k in ATTRIBUTE_LABELS if k in attrs]
    return "; ".join(f"{ATTRIBUTE_LABELS[k]}: {attrs[k]}" for k in keys) or "none"


def parse_attribute_list(text: str) -> dict[str, str]:
    text = text.strip()
    if text == "none":
        return {}
    out = {}
    for item in text.split("; "):
        label, sep, value = item.partition(": ")
        if not sep or label not in LABEL_TO_FIELD:
            raise ParseError(f"bad attribute item {item!r}")
        out[LABEL_TO_FIELD[label]] = value
    return out


def attribute_prediction_response(attrs: Mapping[str, str]) -> str:
    return f"The pedestrian attributes of this image are: {attribute_list(attrs)}."


def parse_attribute_prediction(response: str) -> dict[str, dict[str, str]]:
    body = _match(r"The pedestrian attributes of this image are: (.*)\.", response).group(1)
    return {"attributes": parse_attribute_list(body)}


_COMMON_UNIQUE = (
    "Common Attributes: {common}.\n"
    "Unique Attributes of the First Image: {first}.\n"
    "Unique Attributes of the Second Image: {second}."
)


def common_unique_response(
    common: Mapping[str, str], first: Mapping[str, str], second: Mapping[str, str]
) -> str:
    return _COMMON_UNIQUE.format(
        common=attribute_list(common), first=attribute_list(first), second=attribute_list(second)
    )


def parse_common_unique(response: str) -> dict[str, dict[str, str]]:
    m = _match(
        r"Common Attributes: (.*)\.\nUnique Attributes of the First Image: (.*)\.\n"
        r"Unique Attributes of the Second Image: (.*)\.",
        response,
    )
    common, first, second = (parse_attribute_list(g) for g in m.groups())
    return {"common": common, "unique_first": first, "unique_second": second}
