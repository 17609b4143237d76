"""The parts of a synthetic face, painted back to front onto a ``Canvas`` in the upright (unposed) crop.

The face is drawn around the crop's vertical centre line; yaw moves inner features more than the outline
(they are nearer the camera), pitch moves nose and mouth against the eyes. ``FaceLayout`` says where the
parts of one identity sit under one set of conditions; each ``draw_*`` function paints one part, and
``PARTS`` lists them in painting order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backdoor_lab.data.faces.canvas import Canvas, bezier, shade
from backdoor_lab.data.faces.crop import FACE_HEIGHT, FACE_WIDTH
from backdoor_lab.data.faces.identity import FaceIdentity, ImageConditions, rgb


@dataclass(frozen=True)
class FaceLayout:
    """Where one face's parts sit in the upright crop, in pixels."""

    cx: float  # centre of the outline
    cy: float
    hw: float  # half width of the outline (a turned head looks narrower) and half height
    hh: float
    fx: float  # the vertical centre line of eyes, nose and mouth
    eye_y: float
    nose_y: float
    mouth_y: float


def face_layout(idt: FaceIdentity, cond: ImageConditions) -> FaceLayout:
    outline_x = FACE_WIDTH / 2.0 + 0.7 * cond.yaw
    eye_y = idt.eye_y - 0.4 * cond.pitch
    nose_y = eye_y + idt.nose_length + 0.8 * cond.pitch
    return FaceLayout(
        cx=outline_x,
        cy=idt.face_centre_y,
        hw=idt.face_half_width * (1 - 0.06 * abs(cond.yaw)),
        hh=idt.face_half_height,
        # eyes, nose and mouth lie nearer the camera than the outline, so a turned head moves them further
        fx=outline_x + 1.6 * cond.yaw,
        eye_y=eye_y,
        nose_y=nose_y,
        mouth_y=nose_y + idt.mouth_gap + 0.4 * cond.pitch,
    )


def _outline(idt: FaceIdentity, at: FaceLayout) -> list[tuple[float, float, float]]:
    """The face outline as (x, y, sine of the angle): an ellipse whose lower half narrows towards the chin.

    Angles 0..pi run down the right side, so points with a positive sine are the jaw.
    """
    angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    sin, cos = np.sin(angles), np.cos(angles)
    narrowing = np.where(sin > 0, 1.0 - (1.0 - idt.jaw_width) * sin**2, 1.0)
    return [(at.cx + at.hw * co * n, at.cy + at.hh * si, si) for co, si, n in zip(cos, sin, narrowing, strict=True)]


def draw_shoulders(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Clothing and neck."""
    cx, cy, hw = at.cx, at.cy, at.hw
    c.ellipse(cx, FACE_HEIGHT + 6, hw + 10, 10, (*cond.clothing, 255))
    c.polygon(
        [
            (cx - 0.55 * hw, cy),
            (cx + 0.55 * hw, cy),
            (cx + 0.6 * hw, FACE_HEIGHT + 2),
            (cx - 0.6 * hw, FACE_HEIGHT + 2),
        ],
        shade(idt.skin, 0.82),
    )


def draw_back_hair(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Long and curly hair that falls behind the head."""
    cx, cy, hw, hh = at.cx, at.cy, at.hw, at.hh
    hair = (*idt.hair_colour, 255)
    top = cy - hh
    if idt.hair_style == "long":
        c.polygon(
            [
                (cx - hw - 2.5, top + 8),
                (cx + hw + 2.5, top + 8),
                (cx + hw + 4, cy + hh * 0.95),
                (cx - hw - 4, cy + hh * 0.95),
            ],
            hair,
        )
        c.ellipse(cx, top + 8, hw + 2.5, 9 + idt.hair_volume, hair)
    if idt.hair_style == "curly":
        c.ellipse(cx, top + 7, hw + 3 + idt.hair_volume, 9 + idt.hair_volume, hair)


def draw_head(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Ears, the face outline, and cheek shading on the side turned away from the camera."""
    cx, cy, hw, hh = at.cx, at.cy, at.hw, at.hh
    ear_y = idt.eye_y + 3.0
    for side in (-1, 1):
        ear_x = cx + side * (hw - 0.6) - 0.8 * cond.yaw * side
        c.ellipse(ear_x, ear_y, 0.55 * idt.ear_size, idt.ear_size, shade(idt.skin, 0.9))
    c.polygon([(x, y) for x, y, _ in _outline(idt, at)], (*idt.skin, 255))
    c.ellipse(
        cx - math.copysign(hw * 0.6, cond.yaw or 1.0),
        cy + 3,
        hw * 0.3,
        hh * 0.4,
        shade(idt.skin, 0.8, int(60 * abs(cond.yaw))),
    )


def draw_beard(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Stubble or a full beard on the jaw below the mouth line, or a goatee under the mouth."""
    beard_colour = shade(idt.hair_colour, 0.9)
    if idt.facial_hair in ("stubble", "full_beard"):
        beard_top = at.mouth_y - 5.0
        chin = [(x, y) for x, y, sin in _outline(idt, at) if sin > 0 and y > beard_top]
        alpha = 70 if idt.facial_hair == "stubble" else 255
        if len(chin) >= 3:
            c.polygon(chin, (*beard_colour[:3], alpha))
    if idt.facial_hair == "goatee":
        c.ellipse(at.fx, at.mouth_y + 4.5, idt.mouth_half_width * 0.6, 3.5, beard_colour)


def draw_moles(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    for dx, dy, r in idt.moles:
        c.ellipse(at.fx + dx * at.hw / 17.0, at.cy + dy, r, r, shade(idt.skin, 0.45))


def draw_eyes(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Eye sockets; white, iris and pupil of an open eye (looking along ``gaze``); lids; brows."""
    eye_y = at.eye_y
    ry = idt.eye_half_height * cond.eye_open
    for side in (-1, 1):
        ex = at.fx + side * idt.eye_half_spacing
        c.ellipse(
            ex, eye_y + 0.6, idt.eye_half_width + 0.6, idt.eye_half_height + 0.8, shade(idt.skin, 0.84)
        )  # eye socket shadow
        if ry > 0.45:
            c.ellipse(ex, eye_y, idt.eye_half_width, ry, (238, 236, 230, 255))
            r_iris = min(ry, idt.eye_half_width * 0.5)
            gx, gy = ex + cond.gaze[0], eye_y + cond.gaze[1] * ry
            c.ellipse(gx, gy, r_iris, r_iris, (*idt.iris, 255))
            c.ellipse(gx, gy, r_iris * 0.45, r_iris * 0.45, (12, 10, 10, 255))
        lid = bezier(
            (ex - idt.eye_half_width, eye_y),
            (ex, eye_y - 2.0 * ry - 0.2),
            (ex + idt.eye_half_width, eye_y),
            8,
        )
        c.line(lid, shade(idt.skin, 0.35), 0.55)
        inner = ex - side * idt.eye_half_width * 0.9
        outer = ex + side * (idt.eye_half_width + 1.2)
        brow_y = eye_y - idt.brow_gap - cond.brow_raise
        brow = bezier(
            (inner, brow_y + 0.3),
            ((inner + outer) / 2, brow_y - idt.brow_arch),
            (outer, brow_y - idt.brow_tilt),
            8,
        )
        c.line(brow, (*idt.brow_colour, 255), idt.brow_thickness)


def draw_nose(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Bridge shadow on the far side, tip, nostrils."""
    fx, nose_y = at.fx, at.nose_y
    nx = fx + 0.9 * cond.yaw
    side = 1.0 if cond.yaw >= 0 else -1.0
    c.line(
        [(fx + side * 1.2, at.eye_y + 1.5), (nx + side * idt.nose_half_width * 0.6, nose_y - 1.0)],
        shade(idt.skin, 0.72),
        0.6,
    )
    c.ellipse(nx, nose_y - 0.4, idt.nose_half_width * 0.6, 1.1, shade(idt.skin, 1.06))
    for side in (-1, 1):
        c.ellipse(nx + side * idt.nose_half_width * 0.55, nose_y + 0.3, 0.75, 0.45, shade(idt.skin, 0.45))


def draw_mouth(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """Lips whose corners the expression bends, the dark gap of an open mouth, and a moustache above."""
    mouth_y = at.mouth_y
    mx, mw = at.fx + 0.3 * cond.yaw, idt.mouth_half_width * (1 + 0.12 * cond.smile)
    corner_y = mouth_y - 1.3 * cond.smile
    gap = 2.2 * cond.mouth_open
    left, right = (mx - mw, corner_y), (mx + mw, corner_y)
    lower = bezier(left, (mx, mouth_y + gap + 2.2 * idt.lip_thickness + 1.2 * cond.smile), right)
    upper = bezier(left, (mx, mouth_y - 1.6 * idt.lip_thickness), right)
    inner_lower = bezier(left, (mx, mouth_y + gap + 0.8 * cond.smile), right)
    inner_upper = bezier(left, (mx, mouth_y + 0.3 * cond.smile), right)
    lip = (*idt.lip_colour, 255)
    c.polygon(upper + inner_upper[::-1], lip)
    c.polygon(inner_lower + lower[::-1], lip)
    if gap > 0.3:
        c.polygon(inner_upper + inner_lower[::-1], (50, 22, 24, 255))
    c.line(inner_upper, shade(idt.lip_colour, 0.55), 0.45)
    if idt.facial_hair in ("moustache", "full_beard"):
        c.line(
            bezier(
                (mx - mw - 0.5, corner_y + 0.5),
                (mx, mouth_y - 3.2 * idt.lip_thickness - 2.0),
                (mx + mw + 0.5, corner_y + 0.5),
            ),
            shade(idt.hair_colour, 0.9),
            1.6,
        )


def draw_hair(c: Canvas, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> None:
    """The hair on top of the head, in the identity's style."""
    cx, cy, hw, hh, eye_y = at.cx, at.cy, at.hw, at.hh, at.eye_y
    style, hair = idt.hair_style, (*idt.hair_colour, 255)
    if style == "bald":
        for side in (-1, 1):
            c.ellipse(cx + side * (hw - 0.5), eye_y - 2.5, 1.6, 4.5, hair)
        return
    hairline_y = eye_y - idt.hairline - (5.0 if style == "receding" else 0.0)
    rx, ry = hw + 0.8 + 0.3 * idt.hair_volume, hh + 0.8 + idt.hair_volume
    # the scalp: the part of a slightly larger ellipse above the hairline
    a0 = math.degrees(math.asin(max(-0.999, min(0.999, (hairline_y - cy) / ry))))
    # cropped hair lets the scalp show through
    scalp = 0.6 * np.array(idt.hair_colour) + 0.4 * np.array(idt.skin) if style == "buzz" else idt.hair_colour
    c.chord(cx, cy, rx, ry, 180 - a0, 360 + a0, (*rgb(scalp), 255))
    if style == "receding":
        for side in (-1, 1):  # hair left at the temples
            c.ellipse(cx + side * (hw - 0.6), eye_y - 5.5, 1.8, 4.5, hair)
    if style == "fringe":
        edge = [(cx - hw * 0.92, hairline_y)]
        for k in range(9):
            x = cx - hw * 0.85 + k * hw * 1.7 / 8
            edge.append((x, hairline_y + 4.5 + (1.2 if k % 2 else 0.0)))
        edge.append((cx + hw * 0.92, hairline_y))
        c.polygon(edge, hair)
    if style == "side_part":
        part = cx + 0.4 * hw * (1 if idt.brow_tilt >= 0 else -1)
        sweep = -1 if part > cx else 1
        c.polygon(
            [
                (part, hairline_y - 3),
                (part + sweep * hw * 1.2, hairline_y - 1),
                (part + sweep * hw * 1.1, hairline_y + 4.0),
                (part, hairline_y + 0.5),
            ],
            hair,
        )
    if style == "long":
        for side in (-1, 1):
            x_out = cx + side * (hw + 1.0)
            c.polygon(
                [
                    (x_out, hairline_y),
                    (x_out - side * 2.4, hairline_y + 2),
                    (x_out - side * 1.4, cy + 6),
                    (x_out + side * 2.0, cy + hh * 0.9),
                ],
                hair,
            )
    if style == "curly":
        for k in range(11):
            a = math.pi + 0.45 + k * (math.pi - 0.9) / 10
            c.ellipse(
                cx + (rx - 0.5) * math.cos(a),
                cy + (ry - 1.0) * math.sin(a),
                3.0,
                3.0,
                shade(idt.hair_colour, 0.85 if k % 2 else 1.0),
            )


# Painting order: what is drawn later covers what was drawn before.
PARTS = (
    draw_shoulders,
    draw_back_hair,
    draw_head,
    draw_beard,
    draw_moles,
    draw_eyes,
    draw_nose,
    draw_mouth,
    draw_hair,
)
