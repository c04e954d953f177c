"""Training time distributions: uniform (the old draw, number for number) and logit-normal
(its moments against the closed forms, within standard errors)."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.config import describe
from flowdiff.paths import GaussianConditionalPath
from flowdiff.times import LogitNormalTime, UniformTime, get_time_distribution
from flowdiff.utils import UsageError

DTYPE = torch.float64
N = 200_000


@pytest.mark.parametrize("time_sampling", ["uniform", UniformTime(), "UniformTime"])
@pytest.mark.parametrize("dtype", [torch.float32, DTYPE])
def test_uniform_is_the_old_draw(time_sampling, dtype):
    """The default draws what ``t_min + (t_max - t_min) * torch.rand`` drew before: old seeded
    runs reproduce."""
    path = GaussianConditionalPath("linear", t_min=0.01, t_max=0.9, time_sampling=time_sampling)
    t = path.sample_time(1000, dtype=dtype, generator=torch.Generator().manual_seed(7))
    u = torch.rand(1000, dtype=dtype, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t, 0.01 + (0.9 - 0.01) * u)
    default = GaussianConditionalPath("linear", t_min=0.01, t_max=0.9)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(default.sample_time(1000, dtype=dtype, generator=g), t)


def logit(t: torch.Tensor) -> torch.Tensor:
    return torch.log(t) - torch.log1p(-t)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.7), (-1.0, 2.0)])
def test_logit_normal_moments(mean, std):
    """On [0, 1]: ``logit t ~ N(mean, std^2)``, so E[logit t] = mean, Var[logit t] = std^2 and
    the median of t is sigmoid(mean). Tolerances: 5 standard errors (mean: std / sqrt(n);
    variance: std^2 sqrt(2 / (n - 1)); the fraction below the median: 1 / (2 sqrt(n)))."""
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0,
                                   time_sampling=LogitNormalTime(mean, std))  # fmt: skip
    t = path.sample_time(N, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    assert t.shape == (N,) and t.dtype == DTYPE
    assert (t > 0).all() and (t < 1).all()
    v = logit(t)
    assert abs(v.mean().item() - mean) < 5 * std / math.sqrt(N)
    assert abs(v.var().item() - std**2) < 5 * std**2 * math.sqrt(2 / (N - 1))
    below = (t < 1 / (1 + math.exp(-mean))).double().mean().item()
    assert abs(below - 0.5) < 5 * 0.5 / math.sqrt(N)


def test_logit_normal_is_mapped_onto_t_min_t_max():
    """u on [0, 1] maps to t_min + (t_max - t_min) u: inside the path's bounds, with the median
    at t_min + (t_max - t_min) sigmoid(mean)."""
    t_min, t_max, mean = 0.2, 0.7, 1.5
    path = GaussianConditionalPath("linear", t_min=t_min, t_max=t_max,
                                   time_sampling=LogitNormalTime(mean, 3.0))  # fmt: skip
    t = path.sample_time(N, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    assert t.min() >= t_min and t.max() <= t_max
    u = (t - t_min) / (t_max - t_min)
    assert abs(logit(u).mean().item() - mean) < 5 * 3.0 / math.sqrt(N)
    median = t_min + (t_max - t_min) / (1 + math.exp(-mean))
    assert abs((t < median).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(N)


def test_names_and_records():
    assert isinstance(get_time_distribution("logit-normal"), LogitNormalTime)
    assert get_time_distribution("flowdiff.times.LogitNormalTime").std == 1.0
    path = GaussianConditionalPath("cosine", time_sampling=LogitNormalTime(0.3, 0.5))
    assert "LogitNormalTime(mean=0.3, std=0.5)" in repr(path)
    assert describe(path)["init_args"]["time_sampling"] == {
        "class_path": "flowdiff.times.LogitNormalTime",
        "init_args": {"mean": 0.3, "std": 0.5},
    }


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_logit_normal_needs_a_positive_std(std):
    with pytest.raises(UsageError, match="std > 0"):
        LogitNormalTime(std=std)


def test_unknown_time_sampling():
    with pytest.raises(UsageError, match="unknown time_sampling 'beta'"):
        GaussianConditionalPath(time_sampling="beta")
