"""The basic colour terms the project names clothes with, and the sRGB each is drawn or
recognised by: the synthetic world paints outfits in them, the text prefilter
(``chatreid.embedder.colour``) reads crops and captions in them."""

from __future__ import annotations

BASIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (232, 232, 228),
    "grey": (128, 128, 132),
    "red": (185, 35, 40),
    "blue": (45, 85, 175),
    "navy": (32, 42, 82),
    "green": (50, 125, 62),
    "yellow": (225, 195, 55),
    "purple": (112, 62, 140),
    "pink": (228, 140, 168),
    "brown": (110, 74, 46),
    "orange": (228, 118, 40),
    "beige": (208, 188, 150),
}
