"""Small helpers shared by the core modules."""

from __future__ import annotations

import torch
from torch import Tensor


class UsageError(ValueError):
    """Bad input from the user: the CLI prints its message on one line and exits non-zero."""


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``t`` of shape (B,) to broadcast against ``x`` of shape (B, *D).

    The one place where time is broadcast against data, so points and images share all code.
    """
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def as_time(t: float | Tensor, x: Tensor) -> Tensor:
    """A (B,) time tensor on ``x``'s device and dtype from a scalar or a (B,) tensor."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t
