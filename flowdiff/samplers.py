"""Samplers: integrate a field from noise ``x_0 ~ N(0, I)`` at ``t_start`` to data at ``t_end``.

``sampler.sample(field, x_0) -> SampleResult(x, trajectory, nfe)``. Samplers know nothing of labels,
networks or Lightning: guidance lives in the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowdiff.fields import Field
from flowdiff.utils import UsageError


@dataclass
class SampleResult:
    """Final samples (B, *D), the trajectory (steps + 1, B, *D) when asked for, and the NFE used."""

    x: Tensor
    trajectory: Tensor | None
    nfe: int


class Sampler:
    """Base class. ``steps`` is the number of integration steps on a uniform time grid."""

    name: str = ""

    def __init__(self, steps: int = 100):
        if int(steps) < 1:
            raise UsageError(f"steps must be a positive integer, got {steps}")
        self.steps = int(steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"

    def time_grid(self, x: Tensor, t_start: float, t_end: float) -> Tensor:
        return torch.linspace(t_start, t_end, self.steps + 1, dtype=x.dtype, device=x.device)

    @torch.no_grad()
    def sample(
        self,
        field: Field,
        x_0: Tensor,
        t_start: float = 0.0,
        t_end: float = 1.0,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> SampleResult:
        ts = self.time_grid(x_0, t_start, t_end)
        x, nfe = x_0, 0
        trajectory = [x_0] if return_trajectory else None
        for i in range(self.steps):
            x, n = self.step(
                field, x, ts[i], ts[i + 1], last=i == self.steps - 1, generator=generator
            )
            nfe += n
            if trajectory is not None:
                trajectory.append(x)
        return SampleResult(x, torch.stack(trajectory) if trajectory else None, nfe)

    def step(self, field, x, t, t_next, last, generator) -> tuple[Tensor, int]:
        """One step from ``t`` to ``t_next``; returns the new state and the NFE it used."""
        raise NotImplementedError


class EulerSampler(Sampler):
    """Euler for the ODE ``dX_t = u_t(X_t) dt``: ``X_{t+h} = X_t + h u_t(X_t)``. NFE = steps."""

    name = "euler"

    def step(self, field, x, t, t_next, last, generator):
        return x + (t_next - t) * field.velocity(x, t), 1


class HeunSampler(Sampler):
    """Heun (2nd order) for the ODE. NFE = 2 steps - 1.

    Each step predicts with Euler and corrects with the mean of the slopes at both ends; the last
    step is a plain Euler step so the field is never evaluated at ``t_end`` (where a score or noise
    prediction cannot be turned into a velocity).
    """

    name = "heun"

    def step(self, field, x, t, t_next, last, generator):
        h = t_next - t
        u = field.velocity(x, t)
        # Euler step.
        x_next = x + h * u
        if last:
            return x_next, 1
        # Apply 2nd order correction.
        return x + 0.5 * h * (u + field.velocity(x_next, t_next)), 2


class EulerMaruyamaSampler(Sampler):
    """Euler–Maruyama for ``dX_t = [u_t + sigma_t^2 / 2 grad log p_t](X_t) dt + sigma_t dW_t``.

    ``X_{t+h} = X_t + h [u_t + sigma_t^2 / 2 s_t](X_t) + sigma_t sqrt(h) xi``, ``xi ~ N(0, I)``.
    The score term makes it exact in the continuum limit for any ``sigma_t``. The last step is a
    noise-free Euler step. NFE = steps.

    Args:
        steps: number of steps.
        sigma: diffusion scale.
        sigma_schedule: ``"beta"``: ``sigma_t = sigma * beta_t`` (the course's choice; vanishes at
            t = 1 where the score blows up) or ``"constant"`` for ``sigma_t = sigma``.
    """

    name = "euler-maruyama"

    def __init__(
        self,
        steps: int = 100,
        sigma: float = 1.0,
        sigma_schedule: Literal["beta", "constant"] = "beta",
    ):
        super().__init__(steps)
        if sigma < 0 or not math.isfinite(sigma):
            raise UsageError(f"sigma must be a finite number >= 0, got {sigma}")
        if sigma_schedule not in ("beta", "constant"):
            raise UsageError(
                f"unknown sigma_schedule {sigma_schedule!r}; expected 'beta' or 'constant'"
            )
        self.sigma, self.sigma_schedule = float(sigma), sigma_schedule

    def __repr__(self) -> str:
        return (
            f"EulerMaruyamaSampler(steps={self.steps}, sigma={self.sigma}, "
            f"sigma_schedule={self.sigma_schedule!r})"
        )

    def sigma_t(self, field: Field, t: Tensor) -> Tensor:
        if self.sigma_schedule == "constant":
            return torch.as_tensor(self.sigma, dtype=t.dtype, device=t.device)
        return self.sigma * field.path.schedule(t).beta_t

    def step(self, field, x, t, t_next, last, generator):
        h = t_next - t
        if last:
            return x + h * field.velocity(x, t), 1
        u, s = field.velocity_and_score(x, t)
        sigma_t = self.sigma_t(field, t)
        # Drawn where the generator lives (the CLI's is on the CPU), so a seed fixes the noise.
        device = generator.device if generator is not None else x.device
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
        return x + h * (u + 0.5 * sigma_t**2 * s) + sigma_t * torch.sqrt(h) * xi, 1


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (EulerSampler, HeunSampler, EulerMaruyamaSampler)
}


def get_sampler(name: str, steps: int = 100, **kwargs) -> Sampler:
    """The sampler called ``name`` (one of ``SAMPLERS``) with ``steps`` steps."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    if cls is not EulerMaruyamaSampler:
        if kwargs:
            raise UsageError(f"sampler {name!r} takes no {', '.join(sorted(kwargs))}")
        return cls(steps)
    return cls(steps, **kwargs)
