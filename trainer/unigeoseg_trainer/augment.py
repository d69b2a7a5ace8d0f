"""Flips that keep image, mask, coordinates and words consistent.

A left-right flip mirrors the image and the mask, maps every normalised X coordinate written
in the text to ``1 - X`` (a box's two corners swap their X values, so it stays
``x0 <= x1``), and swaps the words that name a side: left / right, east / west, clockwise /
counterclockwise, and the compounds (leftmost, northeast, ...). A top-bottom flip does the
same for Y and top / bottom, upper / lower, above / below, north / south.

Where the text cannot be mirrored with certainty, the flip is not applied to that example:
a phrase in which a side word means something else ("right angle", "all right", "on top
of"), or a bracketed coordinate pair outside [0, 1] (not normalised). Case is kept
(``Left`` -> ``Right``), and so is the number of decimals of each coordinate.

Frames: images ``H x W x 3`` and masks ``H x W`` (row 0 at the top); coordinates ``[X,Y]``
fractions of the width (rightwards) and height (downwards), as the interactive instructions
write them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

#: Which flips exist: the array axis each mirrors.
FLIP_AXES = {"horizontal": 1, "vertical": 0}


def _both_ways(pairs: dict[str, str]) -> dict[str, str]:
    return {**pairs, **{b: a for a, b in pairs.items()}}


#: Side words each flip exchanges (lower case; matched as whole words, case kept).
SWAPS = {
    "horizontal": {
        **_both_ways({"left": "right", "leftmost": "rightmost", "lefthand": "righthand",
                      "east": "west", "eastern": "western", "eastward": "westward",
                      "eastwards": "westwards", "northeast": "northwest",
                      "northeastern": "northwestern", "southeast": "southwest",
                      "southeastern": "southwestern", "clockwise": "counterclockwise"}),
        "anticlockwise": "clockwise",
    },
    "vertical": {
        **_both_ways({"top": "bottom", "topmost": "bottommost", "upper": "lower",
                      "uppermost": "lowermost", "above": "below", "north": "south",
                      "northern": "southern", "northward": "southward",
                      "northwards": "southwards", "northeast": "southeast",
                      "northeastern": "southeastern", "northwest": "southwest",
                      "northwestern": "southwestern", "clockwise": "counterclockwise"}),
        "anticlockwise": "clockwise",
    },
}

#: Phrases in which a side word does not name a side of the image: the flip is skipped.
BLOCKING_PHRASES = {
    "horizontal": ("right angle", "right-angle", "right angled", "right-angled", "all right",
                   "right away", "right now", "left behind", "left over"),
    "vertical": ("on top of", "top view", "top-down", "from above", "above ground",
                 "above sea level", "below sea level"),
}

_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"
#: ``[X,Y]``, spaces allowed (the official parser allows none; the text keeps its own).
_PAIR = re.compile(r"\[(\s*)" + _NUMBER + r"(\s*,\s*)" + _NUMBER + r"(\s*)\]")
#: ``x0,y0=[X,Y], x1,y1=[X,Y]``: the box the interactive instructions write.
_BOX = re.compile(r"x0\s*,\s*y0\s*=\s*" + _PAIR.pattern + r"\s*,\s*x1\s*,\s*y1\s*=\s*"
                  + _PAIR.pattern)
_COORDINATES = re.compile(f"(?:{_BOX.pattern})|(?:{_PAIR.pattern})")


def _keep_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def _mirror(number: str) -> str:
    """``1 - number`` with the original's number of decimals."""
    decimals = len(number.split(".")[1]) if "." in number else 0
    return f"{1.0 - float(number):.{decimals}f}"


def _mirror_coordinates(match: re.Match[str], axis: int) -> str:
    """One box or ``[X,Y]`` pair with value ``axis`` (0: X, 1: Y) mirrored; the rest of the
    text (spacing, labels) unchanged."""
    text = match.group(0)
    pairs = list(_PAIR.finditer(text))
    values = [[p.group(2), p.group(4)] for p in pairs]
    if len(pairs) == 2 and _BOX.fullmatch(text):
        # the corners exchange the mirrored value, so x0 <= x1 (y0 <= y1) still holds
        values[0][axis], values[1][axis] = _mirror(values[1][axis]), _mirror(values[0][axis])
    else:
        for v in values:
            v[axis] = _mirror(v[axis])
    out, last = [], 0
    for p, (first, second) in zip(pairs, values, strict=True):
        out.append(text[last:p.start()])
        out.append(f"[{p.group(1)}{first}{p.group(3)}{second}{p.group(5)}]")
        last = p.end()
    out.append(text[last:])
    return "".join(out)


def flip_text(text: str, flip: str) -> str | None:
    """``text`` as it reads after ``flip`` (``horizontal`` or ``vertical``), or None when it
    cannot be mirrored with certainty (module docstring)."""
    lowered = text.lower()
    if any(phrase in lowered for phrase in BLOCKING_PHRASES[flip]):
        return None
    numbers = [float(v) for m in _PAIR.finditer(text) for v in (m.group(2), m.group(4))]
    if any(not 0.0 <= v <= 1.0 for v in numbers):
        return None
    axis = 0 if flip == "horizontal" else 1
    mirrored = _COORDINATES.sub(lambda m: _mirror_coordinates(m, axis), text)
    swaps = SWAPS[flip]
    return _WORD.sub(lambda m: _keep_case(m.group(0), swaps[m.group(0).lower()])
                     if m.group(0).lower() in swaps else m.group(0), mirrored)


@dataclass(frozen=True)
class Example:
    """A decoded training example, before letterboxing.

    Attributes:
        image: H x W x 3 uint8 RGB.
        mask: H' x W' bool foreground on the same extent (usually H' x W' = H x W).
        instruction, answer: the texts that describe it (answer None without one).
    """

    image: np.ndarray
    mask: np.ndarray
    instruction: str
    answer: str | None


def flip_example(example: Example, flip: str) -> Example | None:
    """``example`` mirrored by ``flip``, or None if its texts cannot follow."""
    instruction = flip_text(example.instruction, flip)
    answer = None if example.answer is None else flip_text(example.answer, flip)
    if instruction is None or (example.answer is not None and answer is None):
        return None
    axis = FLIP_AXES[flip]
    return replace(example, image=np.ascontiguousarray(np.flip(example.image, axis)),
                   mask=np.ascontiguousarray(np.flip(example.mask, axis)),
                   instruction=instruction, answer=answer)


def random_flips(example: Example, hflip: float, vflip: float,
                 rng: np.random.Generator) -> tuple[Example, tuple[str, ...]]:
    """Each flip with its probability (a flip the text cannot follow is left out).

    Returns:
        The example and the flips applied to it.
    """
    applied = []
    for flip, probability in (("horizontal", hflip), ("vertical", vflip)):
        if probability > 0 and rng.random() < probability:
            flipped = flip_example(example, flip)
            if flipped is not None:
                example = flipped
                applied.append(flip)
    return example, tuple(applied)
