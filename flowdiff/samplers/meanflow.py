"""One- and few-step sampling of an average-velocity model (MeanFlow, :mod:`flowdiff.meanflow`).

On the grid ``t_0 < t_1 < ... < t_N``, each step jumps along the model's average velocity::

    x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i, t_{i+1})

exact for the exact ``u`` at any step count (flowdiff's time runs from noise at 0 to data at 1:
the paper's ``z_r = z_t - (t - r) u(z_t, r, t)`` with its time reversed). NFE = steps.
"""

from __future__ import annotations

import torch

from flowdiff.samplers.ode import FixedGridSampler


class MeanFlowSampler(FixedGridSampler):
    """``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i, t_{i+1})``; one step by default. NFE = steps.

    Args: those of :class:`flowdiff.samplers.FixedGridSampler` (``steps`` defaults to 1).
    """

    name = "meanflow"
    needs_average_velocity = True

    def __init__(self, steps: int = 1, grid=None):
        super().__init__(steps, grid)

    def solve(self, field, x_0, t_0, t_1, return_trajectory, generator):
        ts = self.times(t_0, t_1, x_0)
        x, trajectory = x_0, [x_0] if return_trajectory else None
        for i in range(self.steps):
            # Jump from t_i to t_{i+1} along the average velocity.
            x = x + (ts[i + 1] - ts[i]) * field.average_velocity(x, ts[i], ts[i + 1])
            if trajectory is not None:
                trajectory.append(x)
        return x, torch.stack(trajectory) if trajectory else None
