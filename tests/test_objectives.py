"""Training objectives: zero loss at the target, and the CFM oracle of MATH.md."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.objectives import ConditionalFlowMatching, ConditionalScoreMatching
from flowdiff.paths import GaussianConditionalPath
from flowdiff.schedules import SCHEDULES
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)
SHAPES = [(2,), (1, 4, 4)]
DTYPE = torch.float64


def path_sample(name, shape, batch=32, seed=0):
    path = GaussianConditionalPath(name)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *shape), generator=g, dtype=DTYPE)
    eps = torch.randn((batch, *shape), generator=g, dtype=DTYPE)
    t = path.sample_time(batch, dtype=DTYPE, generator=g)
    return path, path.sample(z, t, eps)


OBJECTIVES = [
    pytest.param(ConditionalFlowMatching(), id="cfm"),
    pytest.param(ConditionalScoreMatching("beta2"), id="csm-beta2"),
    pytest.param(ConditionalScoreMatching("none"), id="csm-none"),
]


def exact_target(objective, path, sample):
    """The exact regression target per MATH.md, written out from z, eps and the schedule."""
    c = path.coefficients(sample.t, sample.z)
    if isinstance(objective, ConditionalFlowMatching):
        return c.d_alpha_t * sample.z + c.d_beta_t * sample.eps
    if objective.weighting == "beta2":  # E || beta_t s_theta + eps ||^2: predict the noise
        return sample.eps
    return -sample.eps / c.beta_t  # the conditional score


def test_prediction_kinds():
    assert ConditionalFlowMatching().prediction == "velocity"
    assert ConditionalScoreMatching().prediction == "noise"  # default weighting beta_t^2
    assert ConditionalScoreMatching("beta2").prediction == "noise"
    assert ConditionalScoreMatching("none").prediction == "score"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_loss_at_target(objective, name, shape):
    path, sample = path_sample(name, shape)
    output = exact_target(objective, path, sample)
    loss = objective(output, sample, path)
    assert loss.shape == (sample.z.shape[0],)
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=1e-20)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_loss_is_per_element_mean_squared_error(objective, name, shape):
    path, sample = path_sample(name, shape)
    target = exact_target(objective, path, sample)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(target.shape, generator=g, dtype=DTYPE)
    loss = objective(target + delta, sample, path)
    expected = delta.square().reshape(delta.shape[0], -1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    assert (loss > 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_csm_beta2_equals_beta_squared_weighted_score_loss(name, shape):
    """``|| eps_theta - eps ||^2 = beta_t^2 || s_theta + eps / beta_t ||^2`` with eps = -beta s."""
    path, sample = path_sample(name, shape)
    g = torch.Generator().manual_seed(6)
    score_model = torch.randn(sample.z.shape, generator=g, dtype=DTYPE)
    noise_model = path.score_to_noise(score_model, sample.x_t, sample.t)
    weighted = ConditionalScoreMatching("beta2")(noise_model, sample, path)
    plain = ConditionalScoreMatching("none")(score_model, sample, path)
    beta = path.coefficients(path.clamp_time(sample.t), sample.z).beta_t.flatten()
    torch.testing.assert_close(weighted, beta**2 * plain, rtol=1e-9, atol=1e-12)


def test_csm_unknown_weighting_raises():
    with pytest.raises(UsageError):
        ConditionalScoreMatching("lambda")


@pytest.mark.parametrize(
    "mu, s",
    [
        pytest.param((0.0, 0.0), 1.0, id="mu0-s1"),
        pytest.param((2.0, -1.0), 0.5, id="mu2-s0.5"),
        pytest.param((-3.0, 1.5), 2.0, id="mu-3-s2"),
    ],
)
def test_cfm_oracle_exact_field_attains_s_pi_over_2(mu, s):
    """Target N(mu, s^2 I), linear path, t ~ U[0, 1]: the exact field's CFM loss is s pi / 2."""
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0)
    mean = torch.tensor([mu], dtype=DTYPE)
    field = GaussianMixtureField(path, [1.0], mean, [s])
    objective = ConditionalFlowMatching()
    g = torch.Generator().manual_seed(2024)
    n = 100_000
    z = mean + s * torch.randn(n, 2, generator=g, dtype=DTYPE)
    t = path.sample_time(n, dtype=DTYPE, generator=g)
    assert t.min() >= 0.0 and t.max() <= 1.0
    sample = path.sample(z, t, torch.randn(n, 2, generator=g, dtype=DTYPE))
    loss = objective(field.velocity(sample.x_t, sample.t), sample, path)
    estimate = loss.mean().item()
    stderr = loss.std().item() / math.sqrt(n)
    assert abs(estimate - s * math.pi / 2) < 4 * stderr, (estimate, s * math.pi / 2, stderr)


def test_cfm_oracle_is_a_minimum():
    """Perturbing the exact field increases the CFM loss (Theorem 3: it is the minimiser)."""
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0)
    mean = torch.tensor([[1.0, -2.0]], dtype=DTYPE)
    field = GaussianMixtureField(path, [1.0], mean, [0.7])
    objective = ConditionalFlowMatching()
    g = torch.Generator().manual_seed(11)
    n = 20_000
    z = mean + 0.7 * torch.randn(n, 2, generator=g, dtype=DTYPE)
    t = path.sample_time(n, dtype=DTYPE, generator=g)
    sample = path.sample(z, t, torch.randn(n, 2, generator=g, dtype=DTYPE))
    u = field.velocity(sample.x_t, sample.t)
    exact = objective(u, sample, path).mean()
    for shift in (0.05, -0.05):
        assert objective(u + shift, sample, path).mean() > exact
        assert objective(u * (1 + shift), sample, path).mean() > exact
