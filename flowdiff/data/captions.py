"""Captions as the condition of a dataset: one or several per sample, one drawn each time a
sample is read, and the null caption ``""`` for caption dropout (:mod:`flowdiff.data.labels`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowdiff.utils import UsageError


class CaptionTable:
    """The captions of N samples, in the place of their labels in :class:`Batches`.

    ``index_select(0, rows)`` and slices give a list of strings, one caption per row: a sample
    with several captions gets one of them drawn at random each time it is read (so each epoch
    may see another), from a generator seeded by ``seed``.
    """

    def __init__(self, captions: Sequence[Sequence[str]], seed: int = 0):
        self.captions = [list(c) for c in captions]
        empty = next(
            (i for i, c in enumerate(self.captions) if not any(s.strip() for s in c)), None
        )
        if empty is not None:
            raise UsageError(f"sample {empty} has no caption (an empty caption is the null one)")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.captions)

    def _pick(self, row: int) -> str:
        options = self.captions[row]
        if len(options) == 1:
            return options[0]
        return options[int(torch.randint(len(options), (), generator=self.generator))]

    def index_select(self, dim: int, rows: Tensor) -> list[str]:
        return [self._pick(int(i)) for i in rows]

    def __getitem__(self, index: slice) -> list[str]:
        return [self._pick(i) for i in range(*index.indices(len(self)))]

    def all(self) -> list[str]:
        """Every caption of every sample, in order."""
        return [caption for options in self.captions for caption in options]
