"""Procedural drawing of pedestrian crops with PIL + numpy.

A person is drawn at 2x resolution into a *label map* (one integer per body part), which is then
mapped to colours (RGB cameras) or to heat (infrared cameras) and averaged down 2x2, which gives
anti-aliased edges for free. The background is cut from a per-camera scene at the crop's bbox, so
crops from one camera share their street. Then camera effects: occluder, lighting, low resolution,
blur and sensor noise.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from chatreid.synth.world import (
    COLOURS,
    FRAME_SIZE,
    TAG_SCENE,
    BodyTraits,
    Camera,
    Outfit,
    Sighting,
    Site,
)

# Label map values (0 = background).
(
    BG,
    SKIN,
    SKIN_DARK,
    HAIR,
    UPPER,
    UPPER_DARK,
    PATTERN,
    PATTERN_DARK,
    INNER,
    LOWER,
    LOWER_DARK,
    SHOES,
    HAT,
    DARK,
    BAG,
    BAG_DARK,
    PACK,
    PACK_DARK,
    LOGO,
) = range(19)
N_LABELS = 32

# Apparent temperature per part: skin hottest, clothes warm, carried objects cold.
THERMAL = np.zeros(N_LABELS, dtype=np.float32)
THERMAL[[SKIN, SKIN_DARK, HAIR, UPPER, UPPER_DARK, PATTERN, PATTERN_DARK, INNER]] = (
    238,
    222,
    160,
    192,
    178,
    186,
    172,
    205,
)
THERMAL[[LOWER, LOWER_DARK, SHOES, HAT, DARK, BAG, BAG_DARK, PACK, PACK_DARK, LOGO]] = (
    182,
    168,
    112,
    140,
    125,
    82,
    72,
    92,
    80,
    188,
)
LONG_SLEEVES = {"shirt", "jacket", "hoodie", "coat"}
BUILD_FACTOR = {"slim": 0.86, "average": 1.0, "heavy": 1.2}


# ----------------------------------------------------------------------------- geometry


class _Body:
    """Key lengths of one person on a 2x canvas of size (W, H), in pixels."""

    def __init__(self, t: BodyTraits, width: int, height: int, rng: np.random.Generator) -> None:
        b = BUILD_FACTOR[t.build]
        self.u = u = height * rng.uniform(0.88, 0.93)
        self.top = height * rng.uniform(0.025, 0.05)
        self.cx = width / 2 + width * rng.uniform(-0.04, 0.04)
        teen = t.age == "teen"
        self.head_h = u * (0.14 if teen else 0.128)
        self.head_w = self.head_h * 0.8
        female = t.gender == "female"
        self.sw = u * 0.122 * b * (0.9 if female else 1.0)  # shoulder half width
        self.hw = u * 0.098 * b * (1.06 if female else 1.0)  # hip half width
        self.waist = u * 0.092 * b * (1.12 if t.build == "heavy" else 1.0)
        self.aw = u * 0.048 * math.sqrt(b)  # arm width
        self.lw = u * 0.07 * math.sqrt(b)  # leg width
        self.depth = u * 0.068 * b  # torso half depth, side view
        slouch = t.posture == "slouched"
        self.head_top = self.top + (0.012 * u if slouch else 0.0)
        self.head_dx = 0.02 * u if slouch else 0.0  # side view: head pushed forward
        self.shoulder_y = self.top + u * (0.17 + (0.006 if slouch else 0.0))
        leg_ratio = 0.49 if t.height_cm >= 182 else 0.51 if t.height_cm < 160 else 0.5
        self.hip_y = self.top + u * leg_ratio
        self.knee_y = self.top + u * 0.73
        self.ankle_y = self.top + u * 0.955
        self.foot_y = self.top + u
        self.tilt = 0.012 * u if t.posture == "leaning" else 0.0

    @property
    def head_bottom(self) -> float:
        return self.head_top + self.head_h


Point = tuple[float, float]


def _limb(d: ImageDraw.ImageDraw, a: Point, b: Point, w0: float, w1: float, fill: int) -> None:
    """A tapered quad from a (width w0) to b (width w1)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    n = math.hypot(dx, dy) or 1.0
    px, py = -dy / n, dx / n
    d.polygon(
        [
            (a[0] + px * w0 / 2, a[1] + py * w0 / 2),
            (b[0] + px * w1 / 2, b[1] + py * w1 / 2),
            (b[0] - px * w1 / 2, b[1] - py * w1 / 2),
            (a[0] - px * w0 / 2, a[1] - py * w0 / 2),
        ],
        fill=fill,
    )


def _lerp(a: Point, b: Point, f: float) -> Point:
    return (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: int) -> None:
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _leg(d: ImageDraw.ImageDraw, g: _Body, hip: Point, foot: Point, o: Outfit, dark: bool) -> None:
    cloth = LOWER_DARK if dark else LOWER
    skin = SKIN_DARK if dark else SKIN
    knee = _lerp(hip, foot, 0.5)
    if o.lower_type in ("trousers", "jeans"):
        _limb(d, hip, foot, g.lw, g.lw * 0.8, cloth)
        if o.lower_type == "jeans":  # outer seam
            _limb(
                d,
                _lerp(hip, foot, 0.05),
                _lerp(hip, foot, 0.95),
                g.lw * 0.08,
                g.lw * 0.08,
                LOWER_DARK,
            )
    elif o.lower_type == "shorts":
        _limb(d, hip, foot, g.lw * 0.8, g.lw * 0.6, skin)
        _limb(d, hip, _lerp(hip, knee, 0.7), g.lw * 1.05, g.lw * 1.0, cloth)
    else:  # skirt legs are skin; the skirt itself is drawn over the hips
        _limb(d, hip, foot, g.lw * 0.75, g.lw * 0.55, skin)


def _shoe(d: ImageDraw.ImageDraw, g: _Body, foot: Point, forward: float) -> None:
    """forward: 0 for front/back views, +-1 for side views (toe direction)."""
    half = g.lw * (0.55 if forward == 0 else 0.45)
    x0, x1 = foot[0] - half, foot[0] + half
    if forward > 0:
        x1 += g.lw * 0.55
    elif forward < 0:
        x0 -= g.lw * 0.55
    d.rounded_rectangle(
        (x0, foot[1] - g.u * 0.028, x1, foot[1] + g.u * 0.04), radius=g.u * 0.015, fill=SHOES
    )


def _skirt(d: ImageDraw.ImageDraw, g: _Body, x0: float, x1: float) -> None:
    flare = (x1 - x0) * 0.22
    bottom = g.knee_y + g.u * 0.01
    d.polygon(
        [
            (x0, g.hip_y - 0.03 * g.u),
            (x1, g.hip_y - 0.03 * g.u),
            (x1 + flare, bottom),
            (x0 - flare, bottom),
        ],
        fill=LOWER,
    )


# ----------------------------------------------------------------------------- front/back view


def _draw_front_back_stage1(
    d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits, o: Outfit, back: bool, stride: float
) -> None:
    cx, u = g.cx, g.u
    if not back and t.hair_style == "long":  # hair falling behind the shoulders
        d.rectangle(
            (
                cx - g.head_w * 0.62,
                g.head_top + g.head_h * 0.35,
                cx + g.head_w * 0.62,
                g.shoulder_y + 0.075 * u,
            ),
            fill=HAIR,
        )
    if not back and o.upper_type == "hoodie":  # hood bunched behind the neck
        _ellipse(d, cx, g.head_bottom, g.head_w * 0.78, g.head_h * 0.45, UPPER_DARK)
    swing = math.sin(2 * math.pi * stride)
    for side in (-1, 1):
        hip = (cx + side * g.hw * 0.5, g.hip_y - 0.02 * u)
        lift = 0.018 * u * max(0.0, swing * side)  # the lifted foot is a bit higher
        foot = (cx + side * (g.hw * 0.55 + g.lw * 0.1), g.ankle_y - lift)
        _leg(d, g, hip, foot, o, dark=False)
        _shoe(d, g, (foot[0], foot[1] + 0.005 * u), 0)
    if o.lower_type in ("trousers", "jeans"):  # crotch
        d.polygon(
            [
                (cx - g.hw, g.hip_y - 0.04 * u),
                (cx + g.hw, g.hip_y - 0.04 * u),
                (cx + g.hw * 0.55, g.hip_y + 0.07 * u),
                (cx - g.hw * 0.55, g.hip_y + 0.07 * u),
            ],
            fill=LOWER,
        )
    elif o.lower_type == "shorts":
        d.polygon(
            [
                (cx - g.hw, g.hip_y - 0.04 * u),
                (cx + g.hw, g.hip_y - 0.04 * u),
                (cx + g.hw * 1.08, g.hip_y + 0.1 * u),
                (cx - g.hw * 1.08, g.hip_y + 0.1 * u),
            ],
            fill=LOWER,
        )
    else:
        _skirt(d, g, cx - g.hw * 1.02, cx + g.hw * 1.02)
    _torso_front(d, g, o)
    _arms_front(d, g, o, swing)


def _torso_front(d: ImageDraw.ImageDraw, g: _Body, o: Outfit) -> None:
    cx, u, sy = g.cx, g.u, g.shoulder_y
    bottom = g.hip_y + (0.2 * u if o.upper_type == "coat" else 0.025 * u)
    bottom_half = g.hw * (1.22 if o.upper_type == "coat" else 1.02)
    left_y, right_y = sy + g.tilt, sy - g.tilt
    d.polygon(
        [
            (cx - g.sw, left_y + 0.025 * u),
            (cx - g.sw * 0.8, left_y),
            (cx + g.sw * 0.8, right_y),
            (cx + g.sw, right_y + 0.025 * u),
            (cx + g.waist, g.hip_y - 0.1 * u),
            (cx + bottom_half, bottom),
            (cx - bottom_half, bottom),
            (cx - g.waist, g.hip_y - 0.1 * u),
        ],
        fill=UPPER,
    )
    for side, y in ((-1, left_y), (1, right_y)):  # rounded shoulders
        _ellipse(
            d, cx + side * (g.sw - g.aw * 0.45), y + g.aw * 0.55, g.aw * 0.6, g.aw * 0.6, UPPER
        )


def _arms_front(d: ImageDraw.ImageDraw, g: _Body, o: Outfit, swing: float) -> None:
    cx, u = g.cx, g.u
    long_sleeve = o.upper_type in LONG_SLEEVES
    for side in (-1, 1):
        tilt = g.tilt * (1 if side < 0 else -1)
        shoulder = (cx + side * (g.sw - g.aw * 0.3), g.shoulder_y + tilt + g.aw * 0.45)
        reach = 0.012 * u * swing * side  # arm swinging shortens it a little in this view
        wrist = (cx + side * (max(g.hw, g.waist) + g.aw * 0.45), g.hip_y + 0.01 * u - reach)
        if long_sleeve:
            _limb(d, shoulder, wrist, g.aw, g.aw * 0.8, UPPER_DARK)
        else:
            _limb(d, shoulder, wrist, g.aw * 0.8, g.aw * 0.65, SKIN)
            _limb(d, shoulder, _lerp(shoulder, wrist, 0.38), g.aw * 1.05, g.aw * 0.95, UPPER_DARK)
        _ellipse(d, wrist[0], wrist[1] + g.aw * 0.3, g.aw * 0.42, g.aw * 0.55, SKIN)


def _draw_front_back_stage2(
    d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits, o: Outfit, back: bool
) -> None:
    cx, u, hw, hh, ht = g.cx, g.u, g.head_w, g.head_h, g.head_top
    if not back:
        _front_details(d, g, o)
    d.rectangle(
        (cx - hw * 0.22, g.head_bottom - hh * 0.15, cx + hw * 0.22, g.shoulder_y + 0.012 * u),
        fill=SKIN_DARK,
    )
    d.ellipse((cx - hw / 2, ht, cx + hw / 2, ht + hh), fill=SKIN)
    if back and o.upper_type == "hoodie":  # hood lying on the upper back
        _ellipse(d, cx, g.shoulder_y + 0.03 * u, hw * 0.72, 0.055 * u, UPPER_DARK)
    if back:
        _hair_back(d, g, t)
    else:
        _face_front(d, g, t)
        _hair_front(d, g, t)
    if o.hat_colour:
        d.chord((cx - hw * 0.57, ht - hh * 0.1, cx + hw * 0.57, ht + hh * 0.62), 180, 360, fill=HAT)
        if not back:  # brim towards the viewer
            _ellipse(d, cx, ht + hh * 0.3, hw * 0.6, hh * 0.08, HAT)
    _carried_front_back(d, g, o, back)


def _front_details(d: ImageDraw.ImageDraw, g: _Body, o: Outfit) -> None:
    cx, u, sy = g.cx, g.u, g.shoulder_y
    bottom = g.hip_y + (0.2 * u if o.upper_type == "coat" else 0.02 * u)
    if o.upper_type == "jacket":  # open front shows the inner top, plus a zip line
        d.polygon(
            [
                (cx - g.sw * 0.3, sy),
                (cx + g.sw * 0.3, sy),
                (cx + g.sw * 0.16, bottom),
                (cx - g.sw * 0.16, bottom),
            ],
            fill=INNER,
        )
        d.line(
            (cx + g.sw * 0.2, sy + 0.01 * u, cx + g.sw * 0.12, bottom),
            fill=DARK,
            width=max(1, round(u * 0.006)),
        )
    elif o.upper_type == "coat":
        d.line((cx, sy + 0.02 * u, cx, bottom), fill=UPPER_DARK, width=max(1, round(u * 0.008)))
        for k in range(4):
            _ellipse(d, cx + g.sw * 0.12, sy + u * (0.06 + 0.07 * k), u * 0.007, u * 0.007, DARK)
    elif o.upper_type == "shirt":  # collar
        for side in (-1, 1):
            d.polygon(
                [
                    (cx, sy + 0.035 * u),
                    (cx + side * g.sw * 0.42, sy - 0.004 * u),
                    (cx + side * g.sw * 0.1, sy - 0.004 * u),
                ],
                fill=UPPER_DARK,
            )
    elif o.upper_type == "hoodie":  # drawstrings
        for side in (-1, 1):
            d.line(
                (cx + side * g.sw * 0.12, sy, cx + side * g.sw * 0.14, sy + 0.08 * u),
                fill=PATTERN,
                width=max(1, round(u * 0.005)),
            )
    if o.upper_pattern == "logo":
        r = g.sw * 0.32
        ly = sy + 0.1 * u
        if o.clothes_id % 2:
            _ellipse(d, cx, ly, r, r, LOGO)
        else:
            d.rectangle((cx - r * 1.2, ly - r * 0.7, cx + r * 1.2, ly + r * 0.7), fill=LOGO)


def _face_front(d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits) -> None:
    cx, hw, hh, ht = g.cx, g.head_w, g.head_h, g.head_top
    ey = ht + hh * 0.5
    r = max(1.0, hw * 0.065)
    for side in (-1, 1):
        _ellipse(d, cx + side * hw * 0.2, ey, r, r, DARK)
    d.line(
        (cx - hw * 0.12, ht + hh * 0.77, cx + hw * 0.12, ht + hh * 0.77),
        fill=SKIN_DARK,
        width=max(1, round(hh * 0.05)),
    )
    if t.glasses:
        lw = max(1, round(hh * 0.06))
        for side in (-1, 1):
            x = cx + side * hw * 0.2
            d.rectangle(
                (x - hw * 0.17, ey - hh * 0.08, x + hw * 0.17, ey + hh * 0.08),
                outline=DARK,
                width=lw,
            )
        d.line((cx - hw * 0.04, ey, cx + hw * 0.04, ey), fill=DARK, width=lw)


def _hair_front(d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits) -> None:
    cx, hw, hh, ht = g.cx, g.head_w, g.head_h, g.head_top
    if t.hair_style == "bald":
        if t.age == "senior":  # fringe above the ears
            for side in (-1, 1):
                d.rectangle(
                    (
                        cx + side * hw * 0.52 - hw * 0.07,
                        ht + hh * 0.3,
                        cx + side * hw * 0.52 + hw * 0.07,
                        ht + hh * 0.5,
                    ),
                    fill=HAIR,
                )
        return
    d.chord((cx - hw * 0.55, ht - hh * 0.07, cx + hw * 0.55, ht + hh * 0.72), 180, 360, fill=HAIR)
    if t.hair_style == "long":  # locks beside the face
        for side in (-1, 1):
            x = cx + side * hw * 0.48
            d.rectangle(
                (x - hw * 0.1, ht + hh * 0.25, x + hw * 0.1, g.head_bottom + hh * 0.3), fill=HAIR
            )
    elif t.hair_style == "bun":
        _ellipse(d, cx, ht - hh * 0.02, hw * 0.2, hh * 0.12, HAIR)


def _hair_back(d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits) -> None:
    cx, hw, hh, ht, u = g.cx, g.head_w, g.head_h, g.head_top, g.u
    if t.hair_style == "bald":
        if t.age == "senior":
            d.chord(
                (cx - hw * 0.53, ht + hh * 0.2, cx + hw * 0.53, ht + hh * 0.85), 0, 180, fill=HAIR
            )
        return
    if t.hair_style == "long":
        d.polygon(
            [
                (cx - hw * 0.5, ht + hh * 0.4),
                (cx + hw * 0.5, ht + hh * 0.4),
                (cx + hw * 0.68, g.shoulder_y + 0.09 * u),
                (cx - hw * 0.68, g.shoulder_y + 0.09 * u),
            ],
            fill=HAIR,
        )
    d.ellipse((cx - hw * 0.54, ht - hh * 0.05, cx + hw * 0.54, ht + hh * 0.86), fill=HAIR)
    if t.hair_style == "ponytail":
        d.polygon(
            [
                (cx - hw * 0.15, ht + hh * 0.55),
                (cx + hw * 0.15, ht + hh * 0.55),
                (cx + hw * 0.07, g.shoulder_y + 0.06 * u),
                (cx - hw * 0.07, g.shoulder_y + 0.06 * u),
            ],
            fill=HAIR,
        )
    elif t.hair_style == "bun":
        _ellipse(d, cx, ht + hh * 0.28, hw * 0.27, hw * 0.25, HAIR)
        d.arc(
            (
                cx - hw * 0.27,
                ht + hh * 0.28 - hw * 0.25,
                cx + hw * 0.27,
                ht + hh * 0.28 + hw * 0.25,
            ),
            200,
            340,
            fill=DARK,
        )


def _carried_front_back(d: ImageDraw.ImageDraw, g: _Body, o: Outfit, back: bool) -> None:
    cx, u, sy = g.cx, g.u, g.shoulder_y
    if o.backpack_colour:
        if back:
            box = (cx - g.sw * 0.78, sy + 0.02 * u, cx + g.sw * 0.78, g.hip_y - 0.03 * u)
            d.rounded_rectangle(box, radius=g.sw * 0.25, fill=PACK)
            pocket = (
                cx - g.sw * 0.55,
                box[1] + (box[3] - box[1]) * 0.55,
                cx + g.sw * 0.55,
                box[3] - 0.012 * u,
            )
            d.rounded_rectangle(pocket, radius=g.sw * 0.12, fill=PACK_DARK)
            d.line(
                (cx - g.sw * 0.2, box[1] - 0.012 * u, cx + g.sw * 0.2, box[1] - 0.012 * u),
                fill=PACK_DARK,
                width=max(1, round(u * 0.008)),
            )
        else:  # only the straps show
            for side in (-1, 1):
                _limb(
                    d,
                    (cx + side * g.sw * 0.55, sy - 0.004 * u),
                    (cx + side * g.sw * 0.5, sy + 0.2 * u),
                    g.aw * 0.42,
                    g.aw * 0.42,
                    PACK_DARK,
                )
    if o.bag_colour:
        side = 1 if back else -1  # carried on the person's right
        strap_w = max(1, round(u * 0.01))
        top = (cx - side * g.sw * 0.7, sy + 0.005 * u)
        bx = cx + side * (g.hw + 0.02 * u)
        d.line((*top, bx, g.hip_y - 0.06 * u), fill=BAG_DARK, width=strap_w)
        box = (bx - 0.06 * u, g.hip_y - 0.07 * u, bx + 0.06 * u, g.hip_y + 0.06 * u)
        d.rounded_rectangle(box, radius=0.012 * u, fill=BAG)
        d.line(
            (box[0], box[1] + 0.035 * u, box[2], box[1] + 0.035 * u), fill=BAG_DARK, width=strap_w
        )


# ----------------------------------------------------------------------------- side view
# Drawn facing right (+x); the caller mirrors the label map for people facing left.


def _draw_side_stage1(
    d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits, o: Outfit, stride: float
) -> None:
    cx, u = g.cx, g.u
    swing = math.sin(2 * math.pi * stride)
    step = 0.11 * u * swing
    hip = (cx, g.hip_y - 0.02 * u)
    far_foot, near_foot = (cx - step, g.ankle_y), (cx + step, g.ankle_y)
    # far limbs first, darker (in shadow)
    far_wrist = (cx + 0.09 * u * swing, g.hip_y + 0.005 * u)
    shoulder = (cx + g.head_dx * 0.3, g.shoulder_y + g.aw * 0.5)
    _limb(
        d,
        shoulder,
        far_wrist,
        g.aw,
        g.aw * 0.8,
        UPPER_DARK if o.upper_type in LONG_SLEEVES else SKIN_DARK,
    )
    _ellipse(d, far_wrist[0], far_wrist[1] + g.aw * 0.3, g.aw * 0.42, g.aw * 0.5, SKIN_DARK)
    _leg(d, g, hip, far_foot, o, dark=True)
    _shoe(d, g, (far_foot[0], far_foot[1] + 0.005 * u), 1)
    _leg(d, g, hip, near_foot, o, dark=False)
    _shoe(d, g, (near_foot[0], near_foot[1] + 0.005 * u), 1)
    dep = g.depth
    if o.lower_type in ("trousers", "jeans", "shorts"):
        d.polygon(
            [
                (cx - dep * 0.95, g.hip_y - 0.05 * u),
                (cx + dep * 0.95, g.hip_y - 0.05 * u),
                (cx + g.lw * 0.5, g.hip_y + 0.06 * u),
                (cx - g.lw * 0.5, g.hip_y + 0.06 * u),
            ],
            fill=LOWER,
        )
    else:
        _skirt(d, g, cx - dep * 1.0, cx + dep * 1.0)
    lean = g.head_dx * 0.5 + g.tilt
    bottom = g.hip_y + (0.2 * u if o.upper_type == "coat" else 0.025 * u)
    coat = 1.2 if o.upper_type == "coat" else 1.0
    belly = 1.15 if t.build == "heavy" else 1.0
    d.polygon(
        [
            (cx - dep * 0.95 + lean, g.shoulder_y),
            (cx + dep * 0.7 + lean, g.shoulder_y - 0.004 * u),
            (cx + dep * 1.05 + lean * 0.7, g.shoulder_y + 0.1 * u),
            (cx + dep * belly, g.hip_y - 0.08 * u),
            (cx + dep * coat, bottom),
            (cx - dep * coat, bottom),
            (cx - dep * 0.95, g.hip_y - 0.1 * u),
        ],
        fill=UPPER,
    )
    _ellipse(d, cx + lean * 0.8, g.shoulder_y + g.aw * 0.4, g.aw * 0.7, g.aw * 0.55, UPPER)
    near_wrist = (cx - 0.09 * u * swing, g.hip_y + 0.005 * u)
    if o.upper_type in LONG_SLEEVES:
        _limb(d, shoulder, near_wrist, g.aw, g.aw * 0.8, UPPER_DARK)
    else:
        _limb(d, shoulder, near_wrist, g.aw * 0.8, g.aw * 0.65, SKIN)
        _limb(d, shoulder, _lerp(shoulder, near_wrist, 0.38), g.aw * 1.05, g.aw * 0.95, UPPER_DARK)
    _ellipse(d, near_wrist[0], near_wrist[1] + g.aw * 0.3, g.aw * 0.42, g.aw * 0.5, SKIN)


def _draw_side_stage2(d: ImageDraw.ImageDraw, g: _Body, t: BodyTraits, o: Outfit) -> None:
    u, hh, ht = g.u, g.head_h, g.head_top
    hcx = g.cx + g.head_dx + 0.01 * u
    hw = hh * 0.82  # a head is deeper than wide
    dep = g.depth
    if o.backpack_colour:  # sticks out behind the back
        box = (g.cx - dep * 1.75, g.shoulder_y + 0.02 * u, g.cx - dep * 0.6, g.hip_y - 0.04 * u)
        d.rounded_rectangle(box, radius=dep * 0.3, fill=PACK)
        d.rounded_rectangle(
            (
                box[0] - dep * 0.12,
                box[1] + (box[3] - box[1]) * 0.5,
                box[0] + dep * 0.5,
                box[3] - 0.01 * u,
            ),
            radius=dep * 0.15,
            fill=PACK_DARK,
        )
        _limb(
            d,
            (g.cx - dep * 0.2, g.shoulder_y),
            (g.cx + dep * 0.25, g.shoulder_y + 0.16 * u),
            g.aw * 0.4,
            g.aw * 0.4,
            PACK_DARK,
        )
    d.rectangle(
        (hcx - hw * 0.25, g.head_bottom - hh * 0.2, hcx + hw * 0.15, g.shoulder_y + 0.01 * u),
        fill=SKIN_DARK,
    )
    if o.upper_type == "hoodie":
        _ellipse(d, hcx - hw * 0.45, g.shoulder_y, hw * 0.35, 0.04 * u, UPPER_DARK)
    if t.hair_style == "long":
        d.polygon(
            [
                (hcx - hw * 0.5, ht + hh * 0.4),
                (hcx + hw * 0.05, ht + hh * 0.4),
                (hcx - hw * 0.05, g.shoulder_y + 0.08 * u),
                (hcx - hw * 0.62, g.shoulder_y + 0.08 * u),
            ],
            fill=HAIR,
        )
    d.ellipse((hcx - hw / 2, ht, hcx + hw / 2, ht + hh), fill=SKIN)
    d.polygon(
        [
            (hcx + hw * 0.45, ht + hh * 0.45),
            (hcx + hw * 0.62, ht + hh * 0.62),
            (hcx + hw * 0.42, ht + hh * 0.66),
        ],
        fill=SKIN,
    )  # nose
    ey = ht + hh * 0.48
    _ellipse(d, hcx + hw * 0.28, ey, max(1.0, hw * 0.06), max(1.0, hw * 0.06), DARK)
    if t.glasses:
        lw = max(1, round(hh * 0.06))
        d.rectangle(
            (hcx + hw * 0.16, ey - hh * 0.08, hcx + hw * 0.42, ey + hh * 0.08),
            outline=DARK,
            width=lw,
        )
        d.line((hcx + hw * 0.16, ey, hcx - hw * 0.1, ey - hh * 0.02), fill=DARK, width=lw)
    if t.hair_style != "bald":
        d.chord(
            (hcx - hw * 0.56, ht - hh * 0.07, hcx + hw * 0.54, ht + hh * 0.75), 180, 360, fill=HAIR
        )
        d.pieslice(
            (hcx - hw * 0.56, ht - hh * 0.05, hcx + hw * 0.3, ht + hh * 0.9), 90, 270, fill=HAIR
        )
        if t.hair_style == "ponytail":
            d.polygon(
                [
                    (hcx - hw * 0.45, ht + hh * 0.3),
                    (hcx - hw * 0.75, ht + hh * 0.6),
                    (hcx - hw * 0.7, g.shoulder_y + 0.03 * u),
                    (hcx - hw * 0.5, ht + hh * 0.6),
                ],
                fill=HAIR,
            )
        elif t.hair_style == "bun":
            _ellipse(d, hcx - hw * 0.45, ht + hh * 0.25, hw * 0.22, hw * 0.22, HAIR)
    elif t.age == "senior":
        d.rectangle((hcx - hw * 0.5, ht + hh * 0.35, hcx - hw * 0.1, ht + hh * 0.6), fill=HAIR)
    if o.hat_colour:
        d.chord(
            (hcx - hw * 0.58, ht - hh * 0.1, hcx + hw * 0.56, ht + hh * 0.62), 180, 360, fill=HAT
        )
        d.rectangle((hcx, ht + hh * 0.22, hcx + hw * 0.95, ht + hh * 0.3), fill=HAT)
    if o.upper_pattern == "logo":
        _ellipse(d, g.cx + dep * 0.75, g.shoulder_y + 0.1 * u, dep * 0.22, dep * 0.3, LOGO)
    if o.bag_colour:
        bx = g.cx + dep * 0.2
        strap_w = max(1, round(u * 0.01))
        d.line(
            (g.cx - dep * 0.3, g.shoulder_y + 0.005 * u, bx, g.hip_y - 0.06 * u),
            fill=BAG_DARK,
            width=strap_w,
        )
        d.rounded_rectangle(
            (bx - 0.07 * u, g.hip_y - 0.07 * u, bx + 0.05 * u, g.hip_y + 0.06 * u),
            radius=0.012 * u,
            fill=BAG,
        )


# ----------------------------------------------------------------------------- label map


def _apply_pattern(labels: np.ndarray, o: Outfit, g: _Body, rng: np.random.Generator) -> None:
    if o.upper_pattern not in ("striped", "checked"):
        return
    h, w = labels.shape
    period = max(2.0, g.u * rng.uniform(0.03, 0.045))
    rows = ((np.arange(h) - g.top) // period).astype(np.int64) % 2 == 1
    band = np.broadcast_to(rows[:, None], (h, w))
    if o.upper_pattern == "checked":
        cols = ((np.arange(w) - g.cx) // period).astype(np.int64) % 2 == 1
        band = band ^ cols[None, :]
    labels[band & (labels == UPPER)] = PATTERN
    labels[band & (labels == UPPER_DARK)] = PATTERN_DARK


def person_labels(
    t: BodyTraits,
    o: Outfit,
    view: str,
    facing: int,
    stride: float,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, _Body]:
    """Label map (H, W) uint8 of one person filling a canvas of ``size`` = (W, H)."""
    width, height = size
    g = _Body(t, width, height, rng)
    img = Image.new("L", size, BG)
    d = ImageDraw.Draw(img)
    if view == "side":
        _draw_side_stage1(d, g, t, o, stride)
    else:
        _draw_front_back_stage1(d, g, t, o, view == "back", stride)
    labels = np.array(img)
    _apply_pattern(labels, o, g, rng)
    img = Image.fromarray(labels)
    d = ImageDraw.Draw(img)
    if view == "side":
        _draw_side_stage2(d, g, t, o)
    else:
        _draw_front_back_stage2(d, g, t, o, view == "back")
    labels = np.array(img)
    if view == "side" and facing < 0:
        labels = labels[:, ::-1]
        g.cx = width - g.cx
    return labels, g


def colour_lut(t: BodyTraits, o: Outfit) -> np.ndarray:
    lut = np.zeros((N_LABELS, 3), dtype=np.float32)

    def put(label: int, rgb: tuple[int, int, int], shade: float = 1.0) -> None:
        lut[label] = np.asarray(rgb, dtype=np.float32) * shade

    put(SKIN, t.skin_rgb)
    put(SKIN_DARK, t.skin_rgb, 0.84)
    put(HAIR, t.hair_rgb)
    put(UPPER, o.upper_rgb)
    put(UPPER_DARK, o.upper_rgb, 0.8)
    put(PATTERN, o.secondary_rgb)
    put(PATTERN_DARK, o.secondary_rgb, 0.8)
    put(INNER, o.secondary_rgb)
    put(LOGO, o.secondary_rgb)
    put(LOWER, o.lower_rgb)
    put(LOWER_DARK, o.lower_rgb, 0.76)
    put(SHOES, o.shoes_rgb)
    put(DARK, (30, 28, 28))
    for label, colour in ((HAT, o.hat_colour), (BAG, o.bag_colour), (PACK, o.backpack_colour)):
        if colour:
            put(label, COLOURS[colour])
            if label != HAT:  # BAG_DARK / PACK_DARK follow their base label
                put(label + 1, COLOURS[colour], 0.7)
    return lut


# ----------------------------------------------------------------------------- scenes


def _scene(cam: Camera, seed: int) -> np.ndarray:
    """The camera's full RGB frame (H, W, 3) uint8: street or hall plus clutter."""
    rng = np.random.default_rng([seed, TAG_SCENE, cam.index])
    fw, fh = FRAME_SIZE
    hz = cam.horizon
    img = Image.new("RGB", FRAME_SIZE)
    d = ImageDraw.Draw(img)
    if cam.indoor:
        wall = tuple(int(c) for c in rng.integers(150, 225, 3))
        d.rectangle((0, 0, fw, hz), fill=wall)
        x = 0
        while x < fw:  # doors, posters and shop windows along the wall
            w = int(rng.integers(60, 220))
            kind = rng.random()
            if kind < 0.35:
                col = tuple(int(c) for c in rng.integers(60, 140, 3))
                d.rectangle((x, hz - int(hz * 0.65), x + w * 0.6, hz), fill=col)
            elif kind < 0.7:
                col = tuple(int(c) for c in rng.integers(30, 255, 3))
                y0 = int(rng.integers(int(hz * 0.15), int(hz * 0.5)))
                d.rectangle((x, y0, x + w * 0.5, y0 + w * 0.6), fill=col)
            x += w
        floor = tuple(int(c) for c in rng.integers(120, 200, 3))
        d.rectangle((0, hz, fw, fh), fill=floor)
        step = int(rng.integers(50, 110))
        for k in range(-fw, 2 * fw, step):  # tiles converging to the vanishing point
            d.line(
                (fw / 2 + (k - fw / 2) * 0.15, hz, k, fh),
                fill=tuple(int(c * 0.85) for c in floor),
                width=2,
            )
    else:
        sky = tuple(
            int(c) for c in (rng.integers(150, 200), rng.integers(175, 215), rng.integers(200, 240))
        )
        d.rectangle((0, 0, fw, hz), fill=sky)
        x = int(rng.integers(-100, 0))
        while x < fw:  # building facades with windows
            w = int(rng.integers(140, 380))
            top = int(rng.integers(-50, int(hz * 0.6)))
            facade = tuple(int(c) for c in rng.integers(70, 210, 3))
            d.rectangle((x, top, x + w, hz), fill=facade)
            win = tuple(int(c * 0.55) for c in facade)
            for wy in range(top + 20, hz - 40, 55):
                for wx in range(x + 15, x + w - 30, 45):
                    d.rectangle((wx, wy, wx + 22, wy + 30), fill=win)
            x += w + int(rng.integers(0, 40))
        road = tuple(int(c) for c in rng.integers(85, 140, 1).repeat(3) + rng.integers(-6, 7, 3))
        d.rectangle((0, hz, fw, fh), fill=road)
        kerb = hz + int((fh - hz) * rng.uniform(0.08, 0.2))
        d.rectangle((0, hz, fw, kerb), fill=tuple(min(255, c + 35) for c in road))
        for y in range(kerb + 20, fh, 45):
            d.line((0, y, fw, y), fill=tuple(max(0, c - 12) for c in road), width=2)
    for _ in range(cam.clutter):
        _clutter(d, rng, cam)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    arr += rng.normal(0, 5, size=(fh, fw, 1)).astype(np.float32)  # surface texture
    return np.clip(arr, 0, 255).astype(np.uint8)


def _clutter(d: ImageDraw.ImageDraw, rng: np.random.Generator, cam: Camera) -> None:
    fw, fh = FRAME_SIZE
    hz = cam.horizon
    base = float(rng.uniform(hz + 5, fh))
    s = 0.25 + 0.95 * (base - hz) / (fh - hz)  # perspective: nearer is bigger
    x = float(rng.uniform(-30, fw))
    col = tuple(int(c) for c in rng.integers(20, 235, 3))
    kind = int(rng.integers(6))
    if kind == 0:  # pole / lamp post
        d.rectangle((x, base - 520 * s, x + 12 * s, base), fill=(70, 72, 76))
        d.ellipse((x - 14 * s, base - 540 * s, x + 26 * s, base - 510 * s), fill=(210, 210, 170))
    elif kind == 1 and not cam.indoor:  # tree
        d.rectangle((x, base - 200 * s, x + 18 * s, base), fill=(80, 58, 40))
        d.ellipse(
            (x - 90 * s, base - 380 * s, x + 110 * s, base - 160 * s),
            fill=(40 + int(rng.integers(40)), 100 + int(rng.integers(60)), 45),
        )
    elif kind == 2:  # bin / planter
        d.rectangle((x, base - 90 * s, x + 55 * s, base), fill=col)
        d.rectangle(
            (x - 4 * s, base - 96 * s, x + 59 * s, base - 84 * s), fill=tuple(c // 2 for c in col)
        )
    elif kind == 3:  # bench
        d.rectangle((x, base - 70 * s, x + 180 * s, base - 55 * s), fill=col)
        d.rectangle((x, base - 110 * s, x + 180 * s, base - 95 * s), fill=col)
        for leg in (x + 10 * s, x + 160 * s):
            d.rectangle((leg, base - 55 * s, leg + 8 * s, base), fill=(50, 50, 50))
    elif kind == 4:  # sign / poster board
        d.rectangle((x + 20 * s, base - 260 * s, x + 28 * s, base), fill=(90, 90, 90))
        d.rectangle((x, base - 300 * s, x + 80 * s, base - 200 * s), fill=col)
        for k in range(3):
            y = base - (285 - 25 * k) * s
            d.line((x + 10 * s, y, x + 70 * s, y), fill=(240, 240, 240), width=max(1, int(4 * s)))
    else:  # bicycle
        r = 32 * s
        for wx in (x, x + 95 * s):
            d.ellipse(
                (wx - r, base - 2 * r, wx + r, base), outline=(35, 35, 35), width=max(1, int(4 * s))
            )
        d.line(
            (x, base - r, x + 48 * s, base - 2.2 * r, x + 95 * s, base - r),
            fill=col,
            width=max(1, int(5 * s)),
        )


def _ir_scene(rgb: np.ndarray, cam: Camera, seed: int) -> np.ndarray:
    """Thermal frame: dark, texture from the visible scene's luminance, a few warm spots."""
    rng = np.random.default_rng([seed, TAG_SCENE, cam.index, 1])
    lum = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ir = 12 + lum * 0.22
    fh, fw = ir.shape
    yy, xx = np.mgrid[0:fh:4, 0:fw:4]
    warm = np.zeros_like(yy, dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, r = rng.uniform(0, fw), rng.uniform(cam.horizon, fh), rng.uniform(20, 80)
        warm += 45 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    ir += np.kron(warm, np.ones((4, 4), dtype=np.float32))[:fh, :fw]
    return np.clip(ir, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- occluders, effects


def _occlude(img: Image.Image, kind: str, rng: np.random.Generator, infrared: bool) -> None:
    """Draw a scene object over part of the crop (in front of the person)."""
    w, h = img.size
    d = ImageDraw.Draw(img)

    def fill(rgb: tuple[int, ...], heat: int) -> int | tuple[int, ...]:
        return heat if infrared else rgb

    if kind == "pole":
        x0 = w * rng.uniform(0.15, 0.65)
        pw = w * rng.uniform(0.1, 0.2)
        d.rectangle((x0, 0, x0 + pw, h), fill=fill((72, 74, 80), 45))
        d.rectangle((x0 + pw * 0.2, 0, x0 + pw * 0.35, h), fill=fill((120, 122, 128), 50))
    elif kind == "car":
        top = h * rng.uniform(0.55, 0.72)
        col = tuple(int(c) for c in rng.integers(20, 230, 3))
        d.rounded_rectangle((-w * 0.2, top, w * 1.2, h * 1.1), radius=w * 0.15, fill=fill(col, 95))
        d.rectangle(
            (-w * 0.2, top + h * 0.04, w * 1.2, top + h * 0.1),
            fill=fill(tuple(c // 2 for c in col), 80),
        )
    elif kind == "person":  # a passer-by cutting into the crop from one side
        side = -1 if rng.random() < 0.5 else 1
        edge = 0 if side < 0 else w
        reach = w * rng.uniform(0.25, 0.42)
        x0, x1 = (edge - w * 0.35, edge + reach) if side < 0 else (edge - reach, edge + w * 0.35)
        col = tuple(int(c) for c in rng.integers(20, 230, 3))
        d.rounded_rectangle((x0, h * 0.18, x1, h * 0.62), radius=w * 0.08, fill=fill(col, 195))
        leg = tuple(int(c) for c in rng.integers(20, 120, 3))
        d.rectangle((x0 + (x1 - x0) * 0.15, h * 0.6, x1 - (x1 - x0) * 0.15, h), fill=fill(leg, 180))
        hx = (x0 + x1) / 2
        d.ellipse(
            (hx - w * 0.14, h * 0.03, hx + w * 0.14, h * 0.19), fill=fill((200, 160, 130), 230)
        )
    else:  # sign board on a post
        left = rng.random() < 0.5
        x0, x1 = (
            (-w * 0.1, w * rng.uniform(0.35, 0.55))
            if left
            else (w * rng.uniform(0.45, 0.65), w * 1.1)
        )
        y0 = h * rng.uniform(0.3, 0.5)
        col = tuple(int(c) for c in rng.integers(20, 230, 3))
        d.rectangle((x0, y0, x1, y0 + h * 0.25), fill=fill(col, 60))
        for k in range(3):
            y = y0 + h * (0.05 + 0.06 * k)
            d.line(
                (x0 + w * 0.05, y, x1 - w * 0.05, y),
                fill=fill((240, 240, 240), 70),
                width=max(1, h // 80),
            )
        px = (x0 + x1) / 2
        d.rectangle((px - w * 0.03, y0 + h * 0.25, px + w * 0.03, h), fill=fill((90, 90, 90), 50))


def _camera_effects(arr: np.ndarray, cam: Camera, rng: np.random.Generator) -> Image.Image:
    """Lighting, low resolution, blur and sensor noise; arr is float32 in [0, 255]."""
    gain = cam.gain * rng.uniform(0.9, 1.1)
    arr = 255.0 * (np.clip(arr, 0, 255) / 255.0) ** cam.gamma * gain
    infrared = cam.modality == "infrared"
    if not infrared:
        arr = arr * np.asarray(cam.tint, dtype=np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    w, h = img.size
    f = min(1.0, cam.resolution * rng.uniform(0.9, 1.15))
    if f < 0.95:
        small = img.resize((max(8, round(w * f)), max(16, round(h * f))), Image.Resampling.BILINEAR)
        img = small.resize((w, h), Image.Resampling.BILINEAR)
    radius = cam.blur + rng.uniform(0, 0.4)
    if radius > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    out = np.asarray(img, dtype=np.float32)
    out = out + rng.normal(0, 5.0 if infrared else 2.5, size=out.shape).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- renderer


class Renderer:
    """Renders sightings of one site; caches each camera's scene."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self._frames: dict[int, np.ndarray] = {}

    def frame(self, camera: int) -> np.ndarray:
        """The camera's background frame: (H, W, 3) for RGB, (H, W) for infrared."""
        if camera not in self._frames:
            cam = self.site.cameras[camera]
            rgb = _scene(cam, self.site.config.seed)
            self._frames[camera] = (
                _ir_scene(rgb, cam, self.site.config.seed) if cam.modality == "infrared" else rgb
            )
        return self._frames[camera]

    def render(self, s: Sighting) -> Image.Image:
        """The crop at ``s.bbox``: mode "RGB", or "L" for infrared cameras."""
        rng = np.random.default_rng(list(s.seed))
        cam = self.site.cameras[s.camera]
        ident = self.site.identity(s.pid)
        outfit = self.site.outfit(s.pid, s.clothes_id)
        x, y, w, h = s.bbox
        labels, g = person_labels(
            ident.traits, outfit, s.viewpoint, s.facing, s.stride, (2 * w, 2 * h), rng
        )
        person = labels > 0
        bg = self.frame(s.camera)[y : y + h, x : x + w].astype(np.float32)
        bg = bg.repeat(2, axis=0).repeat(2, axis=1)
        infrared = cam.modality == "infrared"
        if infrared:
            heat = THERMAL + np.float32(rng.uniform(-12, 12))
            fg = heat[labels]
        else:
            fg = (
                colour_lut(ident.traits, outfit)[labels] * _shading(g, labels.shape, rng)[..., None]
            )
        comp = np.where(person if infrared else person[..., None], fg, bg)
        # 2x2 box average = anti-aliasing
        comp = comp.reshape(h, 2, w, 2, *comp.shape[2:]).mean(axis=(1, 3))
        img = Image.fromarray(np.clip(comp, 0, 255).astype(np.uint8))
        if s.occluder:
            _occlude(img, s.occluder, rng, infrared)
        img = _camera_effects(np.asarray(img, dtype=np.float32), cam, rng)
        return _bad_cut(img, rng) if s.junk else img


def _shading(g: _Body, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Cylindrical body shading with a light from one side, darker legs."""
    h, w = shape[:2]
    half = g.sw + g.aw
    dx = (np.arange(w, dtype=np.float32) - g.cx) / half
    light = rng.uniform(-0.1, 0.1)
    cols = (1.0 - 0.24 * np.clip(np.abs(dx), 0, 1.4) ** 2) * (1.0 + light * dx)
    rows = np.where(np.arange(h) > g.hip_y, 0.93, 1.0).astype(np.float32)
    return (rows[:, None] * cols[None, :]).astype(np.float32)


def _bad_cut(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A junk detection: a badly placed box showing a fragment of the person."""
    w, h = img.size
    fx, fy = rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.55)
    x0 = int(rng.uniform(0, w * (1 - fx)))
    y0 = int(rng.choice([0, h * (1 - fy)]))
    part = img.crop((x0, y0, x0 + max(4, int(w * fx)), y0 + max(8, int(h * fy))))
    return part.resize((w, h), Image.Resampling.BILINEAR)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
