"""Euler–Maruyama for the SDE that shares the ODE's marginals (MATH.md, "Simulation")."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flowdiff.samplers.grids import TimeGrid
from flowdiff.samplers.ode import FixedGridSampler
from flowdiff.utils import UsageError


class EulerMaruyamaSampler(FixedGridSampler):
    """Euler–Maruyama for ``dX_t = [u_t + sigma_t^2 / 2 grad log p_t](X_t) dt + sigma_t dW_t``.

    ``X_{t+h} = X_t + h [u_t + sigma_t^2 / 2 s_t](X_t) + sigma_t sqrt(h) xi``, ``xi ~ N(0, I)``.
    The score term makes it exact in the continuum limit for any ``sigma_t``. The last step is a
    noise-free Euler step. NFE = steps.

    Stability. Near t = 1 the score term pulls ``X_t`` towards the data at the rate
    ``sigma_t^2 / (2 beta_t^2)``, which explicit Euler follows only while ``h`` times that rate
    stays below 2. So the diffusion used is ``min(sigma_t, beta_t / sqrt(h))``: the rate times
    ``h`` never exceeds 1/2, more steps never hurt, and as ``h -> 0`` the cap moves away from
    every ``t < 1`` (the continuum limit is the SDE with ``sigma_t``). With the ``beta`` schedule
    and ``sigma <= 1 / sqrt(h)`` the cap never binds.

    Args:
        steps: number of steps.
        sigma: diffusion scale.
        sigma_schedule: ``"beta"``: ``sigma_t = sigma * beta_t`` (the course's choice; vanishes at
            t = 1 where the score blows up) or ``"constant"`` for ``sigma_t = sigma``.
        grid: where the steps fall (uniform by default).
    """

    name = "euler-maruyama"

    def __init__(
        self,
        steps: int = 100,
        sigma: float = 1.0,
        sigma_schedule: Literal["beta", "constant"] = "beta",
        grid: TimeGrid | None = None,
    ):
        super().__init__(steps, grid)
        if not sigma >= 0 or not math.isfinite(sigma):
            raise UsageError(f"sigma must be a finite number >= 0, got {sigma}")
        if sigma_schedule not in ("beta", "constant"):
            raise UsageError(
                f"unknown sigma_schedule {sigma_schedule!r}; expected 'beta' or 'constant'"
            )
        self.sigma, self.sigma_schedule = float(sigma), sigma_schedule

    @property
    def deterministic(self) -> bool:
        """Only without diffusion (sigma = 0, an Euler ODE solver) does it draw no noise."""
        return self.sigma == 0

    def sigma_t(self, field, t: Tensor, h: Tensor | None = None) -> Tensor:
        """The diffusion at ``t``; with the step ``h``, capped at ``beta_t / sqrt(|h|)``."""
        beta_t = field.path.schedule(t).beta_t
        if self.sigma_schedule == "constant":
            sigma_t = torch.full_like(t, self.sigma)
        else:
            sigma_t = self.sigma * beta_t
        if h is None:
            return sigma_t
        return torch.minimum(sigma_t, beta_t / torch.sqrt(h.abs()))

    def solve(self, field, x_0, t_0, t_1, return_trajectory, generator):
        ts = self.times(t_0, t_1, x_0)
        x, trajectory = x_0, [x_0] if return_trajectory else None
        # Drawn where the generator lives (the CLI's is on the CPU), so a seed fixes the noise.
        device = generator.device if generator is not None else x.device
        for i in range(self.steps):
            t, h = ts[i], ts[i + 1] - ts[i]
            if i == self.steps - 1:
                x = x + h * field.velocity(x, t)
            else:
                u, s = field.velocity_and_score(x, t)
                sigma_t = self.sigma_t(field, t, h)
                xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
                x = x + h * (u + 0.5 * sigma_t**2 * s) + sigma_t * torch.sqrt(h) * xi.to(x.device)
            if trajectory is not None:
                trajectory.append(x)
        return x, torch.stack(trajectory) if trajectory else None
