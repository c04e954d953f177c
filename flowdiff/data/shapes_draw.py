"""The Shapes pictures and their captions, drawn from a seed: the attributes, the held-out
combinations, the wordings, and the drawing (:mod:`flowdiff.data.shapes` is the datamodule,
:mod:`flowdiff.data.shapes_evaluation` its evaluation)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 50, 50), "green": (50, 190, 70), "blue": (60, 100, 230),
           "yellow": (230, 210, 50)}  # fmt: skip
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS, "size": SIZES}
SIZE_RANGE = {"small": (0.16, 0.175), "large": (0.21, 0.235)}  # half-extent h / S
JITTER = 1 / 96  # largest move of the centre from its quadrant's centre, / S
TEMPLATES = (
    "a {size} {colour} {shape} at the {position}",
    "{size} {colour} {shape}, {position}",
    "a {colour} {shape}, {size}, in the {position} corner",
    "the {shape} is {colour} and {size}, {position}",
)
# (shape, colour, position, size): never in training; each value is held out at least once.
HELD_OUT = (
    ("circle", "red", "top right", "large"),
    ("circle", "blue", "bottom left", "small"),
    ("square", "green", "top left", "small"),
    ("square", "yellow", "bottom right", "large"),
    ("square", "red", "bottom left", "large"),
    ("triangle", "blue", "top left", "large"),
    ("triangle", "red", "bottom right", "small"),
    ("triangle", "yellow", "top right", "small"),
)
COMBINATIONS = tuple(itertools.product(*ATTRIBUTES.values()))  # index: attribute values in order
SEEN = tuple(c for c in COMBINATIONS if c not in HELD_OUT)
VALIDATION_STREAM = 1_000_003  # seed offset of the validation images (training: the seed itself)


def combination_index(combination: tuple[str, str, str, str]) -> int:
    return COMBINATIONS.index(tuple(combination))


def caption(combination: tuple[str, ...], template: int = 0) -> str:
    """The caption of ``(shape, colour, position, size)`` in wording ``template``."""
    return TEMPLATES[template].format(**dict(zip(ATTRIBUTES, combination, strict=True)))


def parse_caption(text: str) -> int:
    """The combination (index into :data:`COMBINATIONS`) a caption names, any wording; a
    ValueError when it does not name one value of each attribute."""
    from flowdiff.text.tokenizer import words

    said = words(text)
    vertical = [w for w in said if w in ("top", "bottom")]
    horizontal = [w for w in said if w in ("left", "right")]
    found = [
        [v for v in SHAPES if v in said],
        [v for v in COLOURS if v in said],
        [f"{a} {b}" for a in vertical for b in horizontal],
        [v for v in SIZES if v in said],
    ]
    if any(len(f) != 1 for f in found):
        raise ValueError(f"{text!r} does not name one shape, colour, position and size")
    return combination_index(tuple(f[0] for f in found))


def draw_shapes(combinations: Tensor, size: int, g: torch.Generator) -> Tensor:
    """uint8 images (N, 3, size, size) of the combinations (N,) (indices into
    :data:`COMBINATIONS`), centre and extent drawn from ``g`` (see the module docstring)."""
    n = len(combinations)
    values = torch.tensor([[ATTRIBUTES[k].index(v) for k, v in zip(ATTRIBUTES, c, strict=True)]
                           for c in COMBINATIONS])[combinations]  # fmt: skip
    shape, colour, position, large = values.unbind(1)
    low = torch.tensor([SIZE_RANGE[s][0] for s in SIZES])[large]
    high = torch.tensor([SIZE_RANGE[s][1] for s in SIZES])[large]
    h = (low + (high - low) * torch.rand(n, generator=g)) * size
    jitter = (2 * torch.rand(n, 2, generator=g) - 1) * JITTER * size
    cy = (0.25 + 0.5 * (position // 2)) * size + jitter[:, 0]  # top row: positions 0, 1
    cx = (0.25 + 0.5 * (position % 2)) * size + jitter[:, 1]  # left column: positions 0, 2
    grid = torch.arange(size) + 0.5
    dy = grid[None, :, None] - cy[:, None, None]  # (N, S, 1)
    dx = grid[None, None, :] - cx[:, None, None]  # (N, 1, S)
    h = h[:, None, None]
    circle = dy**2 + dx**2 <= h**2
    square = (dy.abs() <= h) & (dx.abs() <= h)
    triangle = (dy >= -h) & (dy <= h) & (dx.abs() <= (dy + h) / 2)
    inside = torch.stack([circle, square, triangle], 1)[torch.arange(n), shape]  # (N, S, S)
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)[colour]  # (N, 3)
    return torch.where(inside[:, None], rgb[:, :, None, None], torch.zeros((), dtype=torch.uint8))


def draw_captioned(combinations: Tensor, size: int, g: torch.Generator) -> tuple[Tensor, list]:
    """Images of ``combinations`` and each one's caption in a wording drawn from ``g``."""
    images = draw_shapes(combinations, size, g)
    wording = torch.randint(len(TEMPLATES), (len(combinations),), generator=g)
    return images, [
        caption(COMBINATIONS[c], int(t)) for c, t in zip(combinations, wording, strict=True)
    ]


def reference_combinations(n: int) -> Tensor:
    """Seen and held-out combinations alternately (seen first), each list cycled in order."""
    seen = torch.tensor([combination_index(c) for c in SEEN])
    held = torch.tensor([combination_index(c) for c in HELD_OUT])
    i = torch.arange(n)
    return torch.where(i % 2 == 0, seen[(i // 2) % len(seen)], held[(i // 2) % len(held)])
