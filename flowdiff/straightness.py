"""Straightness of a model's ODE trajectories (Liu et al. 2022, "Flow Straight and Fast", eq. 6):

    S = E ∫_0^1 || (x_1 - x_0) - v(x_t, t) ||^2 dt       along the model's own trajectory x_t

0 exactly when every trajectory is a straight line run at constant speed: then one Euler step is
exact. Computed on a uniform Euler grid of ``steps`` steps from ``t_0`` to ``t_1``, where it is
the spread of the step velocities around their mean: with ``h = (t_1 - t_0) / N`` and
``x_1 - x_0 = h sum_i v_i``,

    S ≈ sum_i h || (x_1 - x_0) / (t_1 - t_0) - v_i ||^2

(the chord's speed over the interval; ``||.||^2`` sums over the data dimensions, as in the paper).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.fields import Field


@torch.no_grad()
def straightness(field: Field, x_0: Tensor, t_0: float = 0.0, t_1: float = 1.0, steps: int = 100):
    """Per-sample straightness (B,) of the Euler trajectories of ``field`` from ``x_0`` (B, *D)."""
    ts = torch.linspace(t_0, t_1, steps + 1, dtype=torch.float64).to(x_0.device, x_0.dtype)
    x, velocities = x_0, []
    for i in range(steps):
        v = field.velocity(x, ts[i].expand(len(x)))
        velocities.append(v)
        x = x + (ts[i + 1] - ts[i]) * v
    chord = (x - x_0) / (t_1 - t_0)
    h = (t_1 - t_0) / steps
    return sum(h * (chord - v).flatten(1).square().sum(1) for v in velocities)
