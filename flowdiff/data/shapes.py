"""Shapes: a synthetic captioned dataset, drawn procedurally from a seed (no files, no downloads).

Each image (3, S, S) shows one flat-coloured shape on black, and its captions name four
attributes: the **shape** (circle, square, triangle), the **colour** (red, green, blue, yellow),
the **position** (the quadrant: top left, top right, bottom left, bottom right) and the **size**
(small, large); 3 x 4 x 4 x 2 = 96 combinations. Every image has four captions, one wording per
:data:`TEMPLATES` (one drawn each time it is read), e.g. ``"a small red circle at the top left"``.

Geometry, in units of the side S (pixel centres at ``i + 1/2``; a pixel is the shape's when its
centre is inside it, so every shape pixel has exactly the caption's colour):

- centre: the quadrant's centre (S/4 or 3S/4 on each axis) moved by up to S/96 on each axis;
- half-extent h: small in [0.16, 0.175] S, large in [0.21, 0.235] S (a large shape is at least
  1.2 times as wide as a small one of its kind; areas 2h^2 (triangle) to 4h^2 (square));
- circle of radius h; square of half-side h (the circle's bounding square); triangle pointing up,
  apex at ``cy - h``, base ``2h`` wide at ``cy + h``. Every shape stays inside its quadrant.

The sizes are chosen so that shapes differ by more than their rasterization: at 24 px a small
circle (radius 3.8 to 4.2 px) and the small square of the same draw differ in at least 8 pixels.
(Until 2026-12-06 the small shapes had h = 3 to 3.5 px and squares of half-side 0.85 h: a small
circle and square then differed in as few as 2 pixels, and every shape error of a trained model
was a circle read as a square or the reverse.)

**Held-out combinations** (:data:`HELD_OUT`): eight full combinations never drawn for training
(every value of every attribute, and every pair of values, still occurs in training). The
reference of ``flowdiff evaluate`` draws seen and held-out combinations alternately, so prompt
adherence is measured on both (:mod:`flowdiff.data.shapes_evaluation`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.data.base import FlowDataModule, check_arguments
from flowdiff.data.batches import Batches
from flowdiff.data.captions import CaptionTable
from flowdiff.data.evaluators import EvalOptions, Evaluator
from flowdiff.data.shapes_draw import (  # noqa: F401 (the data's vocabulary, re-exported)
    ATTRIBUTES,
    COLOURS,
    COMBINATIONS,
    HELD_OUT,
    JITTER,
    POSITIONS,
    SEEN,
    SHAPES,
    SIZE_RANGE,
    SIZES,
    TEMPLATES,
    VALIDATION_STREAM,
    caption,
    combination_index,
    draw_captioned,
    draw_shapes,
    parse_caption,
    reference_combinations,
)
from flowdiff.utils import UsageError


class ShapesDataModule(FlowDataModule):
    """Batches ``(x, captions)``: x (B, 3, S, S) in [-1, 1] of the seen combinations, each
    image with its four captions (one drawn each read). See the module docstring.

    Args:
        image_size: the side S (at least 16).
        num_train: training images, drawn once from ``seed`` (seen combinations, uniformly).
        num_val: validation images (another stream of the same seed).
        p_uncond: caption dropout probability for classifier-free guidance.
        batch_size: batch size of all loaders.
        seed: seed of the images and of the training order.
    """

    captioned = True

    def __init__(
        self,
        image_size: int = 24,
        num_train: int = 20_000,
        num_val: int = 512,
        p_uncond: float = 0.1,
        batch_size: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        check_arguments({"image_size": image_size, "num_train": num_train, "num_val": num_val,
                         "batch_size": batch_size}, seed, p_uncond)  # fmt: skip
        if image_size < 16:
            raise UsageError(f"data.image_size must be at least 16, got {image_size}")
        self.save_hyperparameters()
        self.data_shape = (3, image_size, image_size)
        self.p_uncond = float(p_uncond)
        self._train: tuple[Tensor, CaptionTable] | None = None

    def training_set(self) -> tuple[Tensor, Tensor]:
        """The training images uint8 (N, 3, S, S) and their combinations (N,), from ``seed``."""
        g = torch.Generator().manual_seed(self.hparams.seed)
        seen = torch.tensor([combination_index(c) for c in SEEN])
        combos = seen[torch.randint(len(seen), (self.hparams.num_train,), generator=g)]
        return draw_shapes(combos, self.hparams.image_size, g), combos

    def _table(self, combos: Tensor, seed: int) -> CaptionTable:
        options = [[caption(COMBINATIONS[c], t) for t in range(len(TEMPLATES))] for c in combos]
        return CaptionTable(options, seed)

    def train_data(self) -> tuple[Tensor, CaptionTable]:
        if self._train is None:
            images, combos = self.training_set()
            self._train = images, self._table(combos, self.hparams.seed)
        return self._train

    def captions(self) -> list[str]:
        return self.train_data()[1].all()

    def _loader(self, images: Tensor, table: CaptionTable, generator=None, shard=(0, 1)):
        batches = Batches(images, table, self.hparams.batch_size, generator, *shard)
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(*self.train_data(), *self.epoch_order())

    def val_dataloader(self) -> DataLoader:
        seed = self.hparams.seed + VALIDATION_STREAM
        g = torch.Generator().manual_seed(seed)
        seen = torch.tensor([combination_index(c) for c in SEEN])
        combos = seen[torch.randint(len(seen), (self.hparams.num_val,), generator=g)]
        images = draw_shapes(combos, self.hparams.image_size, g)
        return self._loader(images, self._table(combos, seed))

    def reference_pixels(self, n: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
        """``n`` fresh uint8 images drawn from ``seed``, seen and held-out combinations
        alternately (:func:`reference_combinations`), their combinations and captions."""
        combos = reference_combinations(n)
        images, captions = draw_captioned(combos, self.hparams.image_size,
                                          torch.Generator().manual_seed(seed))  # fmt: skip
        return images, combos, captions

    def reference(self, n: int, seed: int) -> tuple[Tensor, list[str]]:
        """``n`` fresh images in [-1, 1] (seen and held-out combinations alternately) and their
        captions."""
        from flowdiff.metrics.pixels import pixels_to_float

        images, _, captions = self.reference_pixels(n, seed)
        return pixels_to_float(images), captions

    def evaluator(self, options: EvalOptions | None = None) -> Evaluator:
        from flowdiff.data.shapes_evaluation import ShapesEvaluator

        return ShapesEvaluator(self, options)
