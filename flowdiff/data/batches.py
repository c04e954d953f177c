"""Batches sliced from uint8 images held in memory or memory-mapped, converted to float when made.

Shared by the image datamodules (MNIST, image folders): a pass over the rows is one permutation,
batches are row slices of it, and only the rows of a batch are read and converted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from flowdiff.metrics.pixels import pixels_to_float


class Batches(IterableDataset):
    """Whole batches ``(x, y)`` of uint8 ``images`` (N, C, H, W), x as float in [-1, 1] (or
    whatever ``convert`` makes of a batch of rows, e.g. float points as they are).

    ``rows`` (optional) are the indices of ``images`` this dataset covers (a split of a file that
    is memory-mapped, never copied); without it, all rows. With a generator each pass follows a
    fresh random permutation drawn from it; without one the order is fixed. The last batch of a
    pass may be smaller. With ``flip`` (and a generator) each image is mirrored left-right with
    probability 1/2.

    With ``world_size > 1`` (DDP) the pass is split like ``DistributedSampler`` splits it: every
    rank draws the same permutation, pads it by wrapping around to a multiple of ``world_size``
    and takes every ``world_size``-th row from ``rank`` on. The ranks see disjoint rows (but for
    the padding) and the same number of batches. Lightning adds no distributed sampler to an
    iterable dataset, so without this every rank would train on the same batches.

    With ``noise`` (N, ...) float, each batch is ``(x, y, noise)``: the noise stored with each
    row (reflow couplings), sliced by the same rows (``flip`` must then be off).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        rows: Tensor | None = None,
        flip: bool = False,
        convert: Callable[[Tensor], Tensor] = pixels_to_float,
        noise: Tensor | None = None,
    ):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        self.rows, self.flip, self.convert = rows, flip, convert
        self.noise = noise

    def _count(self) -> int:
        return len(self.labels) if self.rows is None else len(self.rows)

    def _rows(self) -> int:
        return -(-self._count() // self.world_size)

    def __len__(self) -> int:
        return -(-self._rows() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n = self._count()
        order = None if self.generator is None else torch.randperm(n, generator=self.generator)
        if self.world_size > 1:
            order = torch.arange(n) if order is None else order
            total = self._rows() * self.world_size
            order = order.repeat(-(-total // n))[:total][self.rank :: self.world_size]
            n = len(order)
        if self.rows is not None:
            order = self.rows if order is None else self.rows[order]
        for start in range(0, n, self.batch_size):
            stop = start + self.batch_size
            rows = torch.arange(start, min(stop, n)) if order is None else order[start:stop]
            if order is None:
                x, y = self.images[start:stop], self.labels[start:stop]
            else:
                x, y = self.images.index_select(0, rows), self.labels.index_select(0, rows)
            x = self.convert(x)
            if self.flip and self.generator is not None:
                mirror = torch.rand(len(x), generator=self.generator) < 0.5
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
            if self.noise is not None:
                yield x, y, self.noise.index_select(0, rows).float()
            else:
                yield x, y
