"""Time grids of the fixed-step samplers: ``s_0 = 0 < s_1 < ... < s_N = 1`` on the unit interval,
mapped to ``t_i = t_0 + (t_1 - t_0) s_i`` between the start and end times of the integration."""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.config import Recorded
from flowdiff.utils import UsageError


class TimeGrid(Recorded):
    """Base class: ``grid(steps) -> (steps + 1,)`` float64 fractions from 0 to 1."""

    def __call__(self, steps: int) -> Tensor:
        raise NotImplementedError

    def times(self, steps: int, t_0: float, t_1: float, like: Tensor) -> Tensor:
        s = self(steps)
        return (t_0 + (t_1 - t_0) * s).to(dtype=like.dtype, device=like.device)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"


class UniformGrid(TimeGrid):
    """Equal steps."""

    def __call__(self, steps: int) -> Tensor:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


class PowerGrid(TimeGrid):
    """``s_i = (i / N)^power``: with ``power > 1`` the steps shrink towards the start ``t_0``.

    The likelihood integrates backward from t = 1, where an image model's field is stiff (most
    pixels are exactly 0): power 2 puts its small steps there.
    """

    def __init__(self, power: float = 2.0):
        if not power >= 1:
            raise UsageError(f"grid power must be >= 1, got {power}")
        self.power = float(power)

    def __call__(self, steps: int) -> Tensor:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** self.power
