"""The stage-3 best-choice prompts, split into the query part and the candidate list.

The wording is the one the model was tuned on in HPT stage 3
(``chatreid.data.instructions.prompts``): every template ends with ``{gallery}``, the
``Image k: <image>`` list. Everything before it (the query image, text clue, instruction) is
the same for every group of candidates a query is shown, so the reranker encodes it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chatreid.data.instructions import IMAGE_TOKEN
from chatreid.data.instructions import prompts as P
from schemas.api import QueryKind  # the one list of kinds; re-exported here

GALLERY = "{gallery}"
TEXT = "{text}"


TEMPLATES: dict[QueryKind, str] = {
    QueryKind.STANDARD: P.STANDARD_PROMPT,
    QueryKind.CLOTH_CHANGING: P.CLOTH_CHANGING_PROMPT,
    QueryKind.VISIBLE_INFRARED: P.VISIBLE_INFRARED_PROMPT,
    QueryKind.TEXT_TO_IMAGE: P.TEXT_TO_IMAGE_PROMPT,
    QueryKind.ATTRIBUTE: P.ATTRIBUTE_QUERY_PROMPT,
    QueryKind.MULTIMODAL: P.MULTIMODAL_PROMPT,
}


@dataclass(frozen=True)
class BestChoicePrompt:
    """``head`` (query, instruction; ends with a newline) + ``gallery`` (the candidate list)."""

    kind: QueryKind
    head: str
    gallery: str

    @property
    def text(self) -> str:
        return self.head + self.gallery

    @property
    def images(self) -> int:
        return self.text.count(IMAGE_TOKEN)


def attribute_text(attributes: Mapping[str, str] | Sequence[str] | str) -> str:
    """Attributes as stage 3 wrote them (``label: value; ...``); free phrases joined alike."""
    if isinstance(attributes, str):
        return attributes
    if isinstance(attributes, Mapping):
        return P.attribute_list(attributes)
    return "; ".join(a.strip() for a in attributes if a.strip()) or "none"


def query_head(kind: QueryKind | str, text: str | None = None) -> str:
    """The prompt up to the candidate list: the part shared by every group of one query."""
    kind = QueryKind.parse(kind)
    if kind.has_text and not (text and text.strip()):
        raise ValueError(f"query kind {kind.value!r} needs a text or attribute clue")
    if text and IMAGE_TOKEN in text:
        # Each placeholder must have an image behind it; a clue cannot add one.
        raise ValueError(f"a text clue cannot contain the image placeholder {IMAGE_TOKEN}")
    template = TEMPLATES[kind]
    if kind.has_text:
        # A clue holding "{gallery}" must stay text: substitute only the template's own slot.
        template = template.replace(TEXT, text.strip())  # pyright: ignore[reportOptionalMemberAccess]  (checked above)
    head, sep, tail = template.rpartition(GALLERY)
    if not sep or tail:
        raise ValueError(f"the {kind.value} template must end with {GALLERY}")
    return head


def best_choice_prompt(
    kind: QueryKind | str, n_candidates: int, text: str | None = None
) -> BestChoicePrompt:
    """The stage-3 prompt for a query and ``n_candidates`` candidates (``<image>`` placeholders:
    the query's first when the kind has one, then one per candidate)."""
    if n_candidates < 1:
        raise ValueError("a best-choice prompt needs at least one candidate")
    kind = QueryKind.parse(kind)
    return BestChoicePrompt(kind, query_head(kind, text), P.gallery_block(n_candidates))
