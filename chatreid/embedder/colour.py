"""The text prefilter: a training-free colour-attribute matcher for text and attribute queries.

The image embedder cannot read text, and no text-image Re-ID weights install offline, so the
cheap first stage for text, attribute and multimodal (image + text) queries compares what both
sides can state about a person: the colour of the upper and of the lower garment.

* an image becomes two colour histograms (13 basic colour terms), one over the torso band and
  one over the legs band of the crop's central columns (person crops are head-to-foot, so the
  bands sit at fixed fractions of the height);
* a text becomes two one-hot vectors: the colour word nearest before an upper-garment noun
  ("a red t-shirt", "a purple zip-up jacket") and before a lower-garment noun; an attribute
  mapping names them directly (``upper_colour``, ``lower_colour``), and so does an attribute
  list as the VLM reads it ("upper clothing colour: red; lower clothing colour: dark blue").

Their dot product is the share of torso pixels in the stated upper colour plus the share of leg
pixels in the stated lower colour; ``distance`` divides by the parts the text names, so it lies
in [0, 1] like a cosine distance. A part the text does not name counts for nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from chatreid.colours import BASIC_COLOURS

# Basic colour terms and the sRGB prototype each is recognised by (nearest prototype wins).
COLOUR_TERMS = BASIC_COLOURS
SYNONYMS = {"gray": "grey", "dark blue": "navy", "navy blue": "navy", "tan": "beige",
            "khaki": "beige", "cream": "beige", "violet": "purple", "light blue": "blue",
            "dark green": "green", "light grey": "grey", "light gray": "grey",
            "dark grey": "grey", "dark gray": "grey"}
UPPER_NOUNS = frozenset({"t-shirt", "tshirt", "tee", "top", "shirt", "jacket", "hoodie",
                         "sweatshirt", "coat", "overcoat", "sweater", "jumper", "blouse",
                         "vest", "cardigan", "jersey", "parka", "windbreaker", "dress"})
LOWER_NOUNS = frozenset({"trousers", "pants", "slacks", "jeans", "shorts", "skirt",
                         "leggings", "capris", "bottoms"})
PARTS = ("upper", "lower")
# Rows (fractions of the crop height) and central columns (fractions of its width) per part.
_BANDS = {"upper": (0.22, 0.45), "lower": (0.58, 0.85)}
_COLUMNS = (0.34, 0.66)
_SIZE = (32, 64)  # (width, height) the crop is reduced to before counting
_LOOKBACK = 6  # words before a garment noun searched for its colour
# Words that end a garment's phrase when looking back ("and" does not: "red and white shirt").
_STOP = frozenset({"with", "wearing", "wears", "in", "has", "is"}) | UPPER_NOUNS | LOWER_NOUNS
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
# "label: value" where the label names a part's colour (``attribute_text``'s form)
_LABELLED = re.compile(r"\b(upper|lower)\b[^:;,]*\bcolou?r\s*:\s*([a-z]+(?: [a-z]+)?)")


class ColourAttributeMatcher:
    """Images and texts to comparable (2 × 13)-d vectors; see the module docstring."""

    version = "colour-attributes-v1"
    terms: tuple[str, ...] = tuple(COLOUR_TERMS)

    def __init__(self) -> None:
        self._prototypes = np.array(list(COLOUR_TERMS.values()), dtype=np.float32)

    @property
    def dim(self) -> int:
        return len(PARTS) * len(self.terms)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self._image(im) for im in images]) if images else np.zeros(
            (0, self.dim), np.float32)

    def embed_texts(self, clues: Sequence[str | Mapping[str, object]]) -> np.ndarray:
        return np.stack([self._onehot(self.parse(c)) for c in clues]) if clues else np.zeros(
            (0, self.dim), np.float32)

    def match(self, texts: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(num_texts, num_images) matched shares in [0, 1]: per part the text names, the share
        of the image's pixels in the named colour, averaged over those parts (0: names none)."""
        named = np.maximum(texts.sum(axis=1, keepdims=True), 1.0)
        return (texts @ images.T) / named

    def distance(self, texts: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(num_texts, num_images) distances in [0, 1]: 1 - ``match``."""
        return 1.0 - self.match(texts, images)

    def parse(self, clue: str | Mapping[str, object]) -> dict[str, str]:
        """{"upper": colour, "lower": colour} for the parts the clue names."""
        if isinstance(clue, Mapping):
            out = {}
            for part in PARTS:
                colour = _term(str(clue.get(f"{part}_colour", "")))
                if colour:
                    out[part] = colour
            return out
        return _parse_text(clue)

    def describe(self, image: Image.Image) -> dict[str, str]:
        """{"upper": colour, "lower": colour}: each part's most common colour term."""
        vec = self._image(image).reshape(len(PARTS), len(self.terms))
        return {part: self.terms[int(vec[p].argmax())] for p, part in enumerate(PARTS)}

    def _image(self, image: Image.Image) -> np.ndarray:
        small = image.convert("RGB").resize(_SIZE, Image.Resampling.BILINEAR)
        pixels = np.asarray(small, np.float32)
        h, w = pixels.shape[:2]
        c0, c1 = int(_COLUMNS[0] * w), int(np.ceil(_COLUMNS[1] * w))
        out = []
        for part in PARTS:
            r0, r1 = (int(f * h) for f in _BANDS[part])
            block = pixels[r0:r1, c0:c1].reshape(-1, 3)
            nearest = ((block[:, None] - self._prototypes[None]) ** 2).sum(-1).argmin(axis=1)
            counts = np.bincount(nearest, minlength=len(self.terms)).astype(np.float32)
            out.append(counts / max(counts.sum(), 1.0))
        return np.concatenate(out)

    def _onehot(self, parsed: Mapping[str, str]) -> np.ndarray:
        vec = np.zeros(self.dim, np.float32)
        for p, part in enumerate(PARTS):
            if part in parsed:
                vec[p * len(self.terms) + self.terms.index(parsed[part])] = 1.0
        return vec


def _term(word: str) -> str | None:
    word = word.strip().lower()
    word = SYNONYMS.get(word, word)
    return word if word in COLOUR_TERMS else None


def _parse_text(text: str) -> dict[str, str]:
    text = text.lower()
    labelled = {part: colour for part, value in _LABELLED.findall(text)
                if (colour := _term(value) or _term(value.split()[0]))}
    return labelled | {k: v for k, v in _parse_words(text).items() if k not in labelled}


def _parse_words(text: str) -> dict[str, str]:
    words = _WORD.findall(text)
    # Two-word colour names first ("dark blue" -> navy) so they are one token.
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in SYNONYMS:
            merged.append(SYNONYMS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    out: dict[str, str] = {}
    for i, word in enumerate(merged):
        part = "upper" if word in UPPER_NOUNS else "lower" if word in LOWER_NOUNS else None
        if part is None or part in out:
            continue  # the first garment of a part is the one described
        colour = _colour_before(merged, i)
        if colour:
            out[part] = colour
    return out


def _colour_before(words: list[str], noun: int) -> str | None:
    """The first colour word of the phrase ending at ``words[noun]`` ("red and white striped
    shirt" -> red: the main colour is named first)."""
    found = None
    for j in range(noun - 1, max(noun - 1 - _LOOKBACK, -1), -1):
        if words[j] in _STOP:
            break
        colour = _term(words[j])
        if colour:
            found = colour
    return found
