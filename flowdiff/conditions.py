"""A batch's condition is labels (B,) or encoded captions (:class:`flowdiff.text.TextCondition`):
the few operations guidance needs on either, in one place."""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.text.condition import TextCondition

Condition = Tensor | TextCondition


def null_condition(y: Condition, null_label: int | None) -> Condition:
    """The null condition of a batch like ``y``: the null label, or the null (empty) caption."""
    return y.null_like() if isinstance(y, TextCondition) else torch.full_like(y, null_label)


def is_null(y: Condition, null_label: int | None) -> Tensor:
    """(B,) bool: which samples carry the null condition."""
    return y.is_null if isinstance(y, TextCondition) else y == null_label


def cat_conditions(a: Condition, b: Condition) -> Condition:
    """Two batches of conditions one after the other."""
    return TextCondition.cat([a, b]) if isinstance(a, TextCondition) else torch.cat([a, b])
