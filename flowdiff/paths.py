"""The Gaussian conditional probability path ``p_t(x|z) = N(alpha_t z, beta_t^2 I)`` (MATH.md).

The path owns all path mathematics: sampling ``x_t``, the conditional vector field and score, and
the conversions between velocity, score, noise and denoiser predictions. Every method is
shape-agnostic: ``x`` is (B, *D), ``t`` is (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowdiff.config import Recorded
from flowdiff.schedules import Schedule, ScheduleOutput, get_schedule
from flowdiff.times import TimeDistribution, get_time_distribution
from flowdiff.utils import UsageError, expand_like

ScheduleName = Literal["linear", "sqrt", "cosine"]  # the aliases of flowdiff.schedules.SCHEDULES
TimeName = Literal["uniform", "logit-normal"]  # the aliases of flowdiff.times.TIME_DISTRIBUTIONS
Prediction = Literal["velocity", "score", "noise"]


@dataclass
class PathSample:
    """One draw from the path: ``x_t = alpha_t z + beta_t eps``, with what made it."""

    x_t: Tensor
    z: Tensor
    eps: Tensor
    t: Tensor
    coefficients: ScheduleOutput | None = None  # alpha_t, beta_t, ... at t, broadcast against z


class GaussianConditionalPath(Recorded):
    """``x_t = alpha_t z + beta_t eps`` with ``eps ~ N(0, I)``, ``z ~ p_data``.

    Args:
        schedule: the ``(alpha_t, beta_t)`` schedule: an object (``class_path`` in YAML) or the
            alias of one: ``linear``, ``sqrt`` or ``cosine``.
        t_min: smallest time used for training and for conversions. Turning a score or noise
            prediction into a velocity divides by ``alpha_t``, which vanishes at t = 0.
        t_max: largest time used for training and for conversions. The conditional score
            ``-eps / beta_t`` (and ``d_beta_t`` of the ``sqrt`` schedule) is infinite at t = 1.
        time_sampling: the distribution of the training times on [0, 1], mapped onto
            ``[t_min, t_max]``: an object (``class_path`` in YAML) or the alias of one:
            ``uniform`` (the default) or ``logit-normal`` (mean 0, std 1; other values through
            ``class_path: flowdiff.times.LogitNormalTime`` and its ``init_args``).
    """

    def __init__(
        self,
        schedule: ScheduleName | Schedule = "linear",
        t_min: float = 1e-3,
        t_max: float = 0.999,
        time_sampling: TimeName | TimeDistribution = "uniform",
    ):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise UsageError(
                f"path needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}"
            )
        self.schedule = get_schedule(schedule)
        self.t_min = t_min
        self.t_max = t_max
        self.time_sampling = get_time_distribution(time_sampling)

    def __repr__(self) -> str:
        return (
            f"GaussianConditionalPath(schedule={self.schedule!r}, "
            f"t_min={self.t_min}, t_max={self.t_max}, time_sampling={self.time_sampling!r})"
        )

    # -- the path itself ------------------------------------------------------------------------

    def coefficients(self, t: Tensor, x: Tensor) -> ScheduleOutput:
        """``alpha_t, beta_t, d_alpha_t, d_beta_t`` at ``t`` (B,), broadcastable against ``x``."""
        return self.schedule(expand_like(t, x))

    def sample_time(self, batch_size: int, device=None, dtype=None, generator=None) -> Tensor:
        """Training times ``t = t_min + (t_max - t_min) u``, ``u ~ time_sampling`` on [0, 1]; (B,).

        The default ``u ~ U[0, 1]`` makes ``t ~ U[t_min, t_max]``.
        """
        u = self.time_sampling(batch_size, device, dtype, generator)
        if self.t_min == 0 and self.t_max == 1:  # the same numbers, two small kernels fewer
            return u
        return self.t_min + (self.t_max - self.t_min) * u

    def sample(self, z: Tensor, t: Tensor, eps: Tensor | None = None) -> PathSample:
        """Draw ``x_t = alpha_t z + beta_t eps``. z: (B, *D); t: (B,)."""
        if eps is None:
            eps = torch.randn_like(z)
        c = self.coefficients(t, z)
        return PathSample(x_t=c.alpha_t * z + c.beta_t * eps, z=z, eps=eps, t=t, coefficients=c)

    def conditional_vector_field(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """``u_t(x|z) = (d_alpha_t - d_beta_t / beta_t * alpha_t) z + d_beta_t / beta_t * x``.

        x, z: (B, *D); t: (B,) with t < 1. Returns (B, *D).
        """
        c = self.coefficients(t, x)
        ratio = c.d_beta_t / c.beta_t
        return (c.d_alpha_t - ratio * c.alpha_t) * z + ratio * x

    def conditional_score(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x|z) = -(x - alpha_t z) / beta_t^2``. x, z: (B, *D); t: (B,)."""
        c = self.coefficients(t, x)
        return -(x - c.alpha_t * z) / c.beta_t**2

    def target(self, sample: PathSample, prediction: Prediction) -> Tensor:
        """The regression target for a network that predicts ``prediction`` at ``sample``.

        velocity: ``d_alpha_t z + d_beta_t eps``; score: ``-eps / beta_t``; noise: ``eps``.
        """
        if prediction == "noise":
            return sample.eps
        c = sample.coefficients or self.coefficients(sample.t, sample.z)
        if prediction == "velocity":
            return c.d_alpha_t * sample.z + c.d_beta_t * sample.eps
        if prediction == "score":
            return -sample.eps / c.beta_t
        raise UsageError(f"unknown prediction {prediction!r}; expected velocity, score or noise")

    # -- conversions (MATH.md, "Velocity <-> score for Gaussian paths") ---------------------------

    def clamp_time(self, t: Tensor) -> Tensor:
        """Keep ``t`` in ``[t_min, t_max]``, where every conversion is finite."""
        return t.clamp(self.t_min, self.t_max)

    def velocity_to_score(self, u: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``s = (u - a_t x) / b_t`` with ``a_t = d_alpha_t / alpha_t``,
        ``b_t = beta_t^2 d_alpha_t / alpha_t - d_beta_t beta_t``.

        Multiplied through by ``alpha_t`` so it is finite at t = 0:
        ``s = (alpha_t u - d_alpha_t x) / (beta_t^2 d_alpha_t - alpha_t beta_t d_beta_t)``.
        Uses ``t`` clamped to ``[t_min, t_max]`` (the denominator vanishes at t = 1).
        """
        c = self.coefficients(self.clamp_time(t), x)
        return (c.alpha_t * u - c.d_alpha_t * x) / (
            c.beta_t**2 * c.d_alpha_t - c.alpha_t * c.beta_t * c.d_beta_t
        )

    def score_to_velocity(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``u = a_t x + b_t s`` (MATH.md). Uses ``t`` clamped to ``[t_min, t_max]``."""
        c = self.coefficients(self.clamp_time(t), x)
        b_t = c.beta_t**2 * c.d_alpha_t / c.alpha_t - c.d_beta_t * c.beta_t
        return c.d_alpha_t / c.alpha_t * x + b_t * s

    def score_to_noise(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``eps_hat = -beta_t s``."""
        return -self.coefficients(self.clamp_time(t), x).beta_t * s

    def noise_to_score(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``s = -eps_hat / beta_t``. Uses ``t <= t_max`` (beta_1 = 0)."""
        return -eps / self.coefficients(self.clamp_time(t), x).beta_t

    def score_to_denoiser(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``E[z | x_t = x] = (x + beta_t^2 s) / alpha_t``. Uses ``t >= t_min`` (alpha_0 = 0)."""
        c = self.coefficients(self.clamp_time(t), x)
        return (x + c.beta_t**2 * s) / c.alpha_t

    def to_velocity_and_score(
        self, output: Tensor, prediction: Prediction, x: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """View one network prediction as both the velocity and the score at ``(x, t)``."""
        if prediction == "velocity":
            return output, self.velocity_to_score(output, x, t)
        if prediction == "noise":
            output = self.noise_to_score(output, x, t)
        elif prediction != "score":
            raise UsageError(
                f"unknown prediction {prediction!r}; expected velocity, score or noise"
            )
        return self.score_to_velocity(output, x, t), output
