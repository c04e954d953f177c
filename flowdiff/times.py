"""Training time distributions: where on ``[0, 1]`` the training times fall.

A distribution draws ``u`` on ``[0, 1]``; the path maps it affinely onto ``[t_min, t_max]``
(:meth:`flowdiff.paths.GaussianConditionalPath.sample_time`), so every distribution keeps the
path's bounds. Drawing t from a density ``p(t)`` instead of uniformly weights the uniform-time
loss by ``p(t)`` in expectation (Esser et al. 2024, SD3, section 3.1): a time distribution is a loss
weighting that spends the samples where the weight is.

Choose one by its alias (:data:`TIME_DISTRIBUTIONS`: ``uniform``, ``logit-normal``), its class name,
or a ``class_path`` with ``init_args`` in YAML, as schedules are chosen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.config import Recorded, call_repr, resolve
from flowdiff.utils import UsageError


class TimeDistribution(Recorded):
    """Base class: ``distribution(batch_size, device, dtype, generator) -> u``, (B,) on [0, 1]."""

    name: str = ""

    def __call__(
        self, batch_size: int, device=None, dtype=None, generator: torch.Generator | None = None
    ) -> Tensor:
        raise NotImplementedError

    __repr__ = call_repr


class UniformTime(TimeDistribution):
    """``u ~ U[0, 1]``: one ``torch.rand`` draw, the same numbers for the same generator state."""

    name = "uniform"

    def __call__(self, batch_size, device=None, dtype=None, generator=None) -> Tensor:
        return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)


class LogitNormalTime(TimeDistribution):
    """``u = sigmoid(mean + std n)``, ``n ~ N(0, 1)`` (SD3's logit-normal sampling).

    ``logit u ~ N(mean, std^2)``; the median of u is ``sigmoid(mean)``. With mean 0 and std 1 the
    density is highest at u = 1/2 and vanishes at both ends, where the target is easiest to learn.

    Args:
        mean: location of ``logit u``; > 0 moves the times towards the data (t = 1).
        std: scale of ``logit u`` (> 0); small values concentrate the times around
            ``sigmoid(mean)``.
    """

    name = "logit-normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if not std > 0:
            raise UsageError(f"logit-normal time sampling needs std > 0, got std={std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, batch_size, device=None, dtype=None, generator=None) -> Tensor:
        n = torch.randn(batch_size, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(self.mean + self.std * n)


TIME_DISTRIBUTIONS: dict[str, type[TimeDistribution]] = {
    cls.name: cls for cls in (UniformTime, LogitNormalTime)
}


def get_time_distribution(distribution: str | TimeDistribution) -> TimeDistribution:
    """A distribution object as it is, or the one ``distribution`` names (an alias of
    :data:`TIME_DISTRIBUTIONS`, a class name or a class path) with its default arguments."""
    if isinstance(distribution, TimeDistribution):
        return distribution
    try:
        cls = resolve(distribution, TimeDistribution, TIME_DISTRIBUTIONS)
    except UsageError:
        raise UsageError(
            f"unknown time_sampling {distribution!r}; expected one of "
            f"{sorted(TIME_DISTRIBUTIONS)} or a class path"
        ) from None
    return cls()
