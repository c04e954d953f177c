"""The Gaussian conditional path: sampling, conditional field and score, conversions (MATH.md)."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.paths import GaussianConditionalPath
from flowdiff.schedules import SCHEDULES
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)
SHAPES = [(2,), (1, 4, 4)]  # points (B, 2) and images (B, 1, 4, 4)
DTYPE = torch.float64


def closed_form(name: str, t: torch.Tensor):
    """alpha, beta, d_alpha, d_beta from MATH.md's table, independent of the library."""
    if name == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    if name == "sqrt":
        return t, torch.sqrt(1 - t), torch.ones_like(t), -0.5 / torch.sqrt(1 - t)
    if name == "cosine":
        a = 0.5 * math.pi * t
        return (
            torch.sin(a),
            torch.cos(a),
            0.5 * math.pi * torch.cos(a),
            -0.5 * math.pi * torch.sin(a),
        )
    raise AssertionError(name)


def bcast(t: torch.Tensor, shape) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) against (B, *shape), written independently of flowdiff.utils."""
    return t.view(-1, *([1] * len(shape)))


def draw(shape, batch=16, seed=0, lo=0.05, hi=0.95):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *shape), generator=g, dtype=DTYPE) * 1.5 + 0.3
    eps = torch.randn((batch, *shape), generator=g, dtype=DTYPE)
    t = lo + (hi - lo) * torch.rand(batch, generator=g, dtype=DTYPE)
    return z, eps, t


# -- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_sample_is_alpha_z_plus_beta_eps(name, shape):
    path = GaussianConditionalPath(name)
    z, eps, t = draw(shape)
    s = path.sample(z, t, eps)
    alpha, beta, _, _ = closed_form(name, t)
    expected = bcast(alpha, shape) * z + bcast(beta, shape) * eps
    torch.testing.assert_close(s.x_t, expected, rtol=1e-13, atol=1e-13)
    assert s.x_t.shape == z.shape
    assert s.z is z and s.eps is eps and s.t is t


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_sample_mean_and_std_monte_carlo(name, shape):
    path = GaussianConditionalPath(name)
    torch.manual_seed(1234)
    n = 4000
    times = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.97], dtype=DTYPE)
    z0 = torch.linspace(-2.0, 3.0, math.prod(shape), dtype=DTYPE).reshape(shape)
    for t_value in times:
        z = z0.expand(n, *shape).clone()
        t = t_value.expand(n).clone()
        x = path.sample(z, t).x_t  # eps drawn inside
        alpha, beta, _, _ = closed_form(name, t_value)
        mean, std = x.mean(0), x.std(0)
        # Monte Carlo: per element, the mean has s.e. beta/sqrt(n), the std about beta/sqrt(2n).
        tol_mean = 5 * beta / math.sqrt(n) + 1e-12
        tol_std = 5 * beta / math.sqrt(2 * n) + 1e-12
        assert (mean - alpha * z0).abs().max() <= tol_mean
        assert (std - beta).abs().max() <= tol_std


@pytest.mark.parametrize("name", NAMES)
def test_sample_at_endpoints(name):
    path = GaussianConditionalPath(name)
    z, eps, _ = draw((2,), batch=8)
    torch.testing.assert_close(path.sample(z, torch.zeros(8, dtype=DTYPE), eps).x_t, eps)
    torch.testing.assert_close(path.sample(z, torch.ones(8, dtype=DTYPE), eps).x_t, z)


@pytest.mark.parametrize("shape", SHAPES)
def test_sample_time_is_uniform_on_t_min_t_max(shape):
    path = GaussianConditionalPath("linear", t_min=0.2, t_max=0.7)
    g = torch.Generator().manual_seed(3)
    n = 20000
    t = path.sample_time(n, dtype=DTYPE, generator=g)
    assert t.shape == (n,) and t.dtype == DTYPE
    assert t.min() >= 0.2 and t.max() <= 0.7
    # U[0.2, 0.7]: mean 0.45, std 0.5 / sqrt(12).
    assert abs(t.mean().item() - 0.45) < 5 * (0.5 / math.sqrt(12)) / math.sqrt(n)
    assert abs(t.std().item() - 0.5 / math.sqrt(12)) < 0.01


# -- conditional vector field and score -----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_conditional_vector_field_is_d_alpha_z_plus_d_beta_eps(name, shape):
    path = GaussianConditionalPath(name)
    z, eps, t = draw(shape, lo=0.0, hi=0.99)
    x = path.sample(z, t, eps).x_t
    _, _, d_alpha, d_beta = closed_form(name, t)
    expected = bcast(d_alpha, shape) * z + bcast(d_beta, shape) * eps
    torch.testing.assert_close(
        path.conditional_vector_field(x, z, t), expected, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_conditional_vector_field_is_time_derivative_of_flow(name, shape):
    path = GaussianConditionalPath(name)
    z, eps, t = draw(shape, lo=0.01, hi=0.99)
    h = 1e-6
    x_plus = path.sample(z, t + h, eps).x_t
    x_minus = path.sample(z, t - h, eps).x_t
    fd = (x_plus - x_minus) / (2 * h)
    x = path.sample(z, t, eps).x_t
    torch.testing.assert_close(path.conditional_vector_field(x, z, t), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_conditional_score_is_minus_eps_over_beta(name, shape):
    path = GaussianConditionalPath(name)
    z, eps, t = draw(shape, lo=0.0, hi=0.99)
    x = path.sample(z, t, eps).x_t
    _, beta, _, _ = closed_form(name, t)
    expected = -eps / bcast(beta, shape)
    torch.testing.assert_close(path.conditional_score(x, z, t), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_conditional_score_is_gradient_of_gaussian_log_density(name, shape):
    path = GaussianConditionalPath(name)
    z, eps, t = draw(shape, lo=0.0, hi=0.99)
    x = path.sample(z, t, eps).x_t.clone().requires_grad_(True)
    alpha, beta, _, _ = closed_form(name, t)
    log_p = -0.5 * ((x - bcast(alpha, shape) * z) / bcast(beta, shape)).square().sum()
    (grad,) = torch.autograd.grad(log_p, x)
    torch.testing.assert_close(
        path.conditional_score(x.detach(), z, t), grad, rtol=1e-10, atol=1e-10
    )


# -- regression targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_targets(name, shape):
    path = GaussianConditionalPath(name)
    z, eps, t = draw(shape, lo=0.0, hi=0.99)
    sample = path.sample(z, t, eps)
    x = sample.x_t
    _, beta, d_alpha, d_beta = closed_form(name, t)
    velocity = bcast(d_alpha, shape) * z + bcast(d_beta, shape) * eps
    torch.testing.assert_close(path.target(sample, "velocity"), velocity, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        path.target(sample, "score"), -eps / bcast(beta, shape), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(path.target(sample, "noise"), eps, rtol=0, atol=0)
    # The targets are the conditional quantities evaluated at the sampled point.
    torch.testing.assert_close(
        path.target(sample, "velocity"),
        path.conditional_vector_field(x, z, t),
        rtol=1e-9,
        atol=1e-9,
    )
    torch.testing.assert_close(
        path.target(sample, "score"), path.conditional_score(x, z, t), rtol=1e-9, atol=1e-9
    )


def test_target_unknown_prediction_raises():
    path = GaussianConditionalPath("linear")
    z, eps, t = draw((2,))
    with pytest.raises(UsageError):
        path.target(path.sample(z, t, eps), "denoiser")


# -- conversions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_velocity_score_round_trips(name, shape):
    path = GaussianConditionalPath(name)
    g = torch.Generator().manual_seed(7)
    x = torch.randn((16, *shape), generator=g, dtype=DTYPE)
    u = torch.randn((16, *shape), generator=g, dtype=DTYPE)
    s = torch.randn((16, *shape), generator=g, dtype=DTYPE)
    t = torch.linspace(path.t_min, path.t_max, 16, dtype=DTYPE)
    inner = slice(1, -1)  # well inside, where the coefficients are well conditioned
    ti, xi, ui, si = t[inner], x[inner], u[inner], s[inner]
    torch.testing.assert_close(
        path.score_to_velocity(path.velocity_to_score(ui, xi, ti), xi, ti), ui, rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(
        path.velocity_to_score(path.score_to_velocity(si, xi, ti), xi, ti), si, rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(
        path.noise_to_score(path.score_to_noise(s, x, t), x, t), s, rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(
        path.score_to_noise(path.noise_to_score(u, x, t), x, t), u, rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_conversion_coefficients_match_math_md(name, shape):
    """``u = a x + b s``, ``a = d_alpha / alpha``, ``b = beta^2 d_alpha / alpha - d_beta beta``."""
    path = GaussianConditionalPath(name)
    g = torch.Generator().manual_seed(8)
    x = torch.randn((16, *shape), generator=g, dtype=DTYPE)
    s = torch.randn((16, *shape), generator=g, dtype=DTYPE)
    t = torch.linspace(0.05, 0.95, 16, dtype=DTYPE)
    alpha, beta, d_alpha, d_beta = closed_form(name, t)
    a = bcast(d_alpha / alpha, shape)
    b = bcast(beta**2 * d_alpha / alpha - d_beta * beta, shape)
    torch.testing.assert_close(
        path.score_to_velocity(s, x, t), a * x + b * s, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        path.score_to_noise(s, x, t), -bcast(beta, shape) * s, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        path.score_to_denoiser(s, x, t),
        (x + bcast(beta, shape) ** 2 * s) / bcast(alpha, shape),
        rtol=1e-10,
        atol=1e-10,
    )
    if name == "linear":  # MATH.md: u = (x + (1 - t) s) / t and s = (t u - x) / (1 - t)
        tt = bcast(t, shape)
        torch.testing.assert_close(
            path.score_to_velocity(s, x, t), (x + (1 - tt) * s) / tt, rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(
            path.velocity_to_score(s, x, t), (tt * s - x) / (1 - tt), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_conversions_on_conditional_quantities(name, shape):
    """Conditional velocity, score, noise, denoiser: views of one another on [t_min, t_max]."""
    path = GaussianConditionalPath(name)
    z, eps, _ = draw(shape)
    t = torch.linspace(path.t_min, path.t_max, z.shape[0], dtype=DTYPE)
    x = path.sample(z, t, eps).x_t
    u_cond = path.conditional_vector_field(x, z, t)
    s_cond = path.conditional_score(x, z, t)
    # Near t_max the conditional score is ~1/beta large: compare relatively.
    torch.testing.assert_close(path.velocity_to_score(u_cond, x, t), s_cond, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(path.score_to_velocity(s_cond, x, t), u_cond, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(path.score_to_noise(s_cond, x, t), eps, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(path.noise_to_score(eps, x, t), s_cond, rtol=1e-7, atol=1e-7)
    # The conditional "posterior" of z given x under p(.|z) is z itself.
    torch.testing.assert_close(path.score_to_denoiser(s_cond, x, t), z, rtol=1e-6, atol=1e-6)
    for prediction, output in (("velocity", u_cond), ("score", s_cond), ("noise", eps)):
        u, s = path.to_velocity_and_score(output, prediction, x, t)
        torch.testing.assert_close(u, u_cond, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(s, s_cond, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_conversions_clamp_time_to_t_min_t_max(name):
    path = GaussianConditionalPath(name, t_min=0.1, t_max=0.9)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 2, generator=g, dtype=DTYPE)
    s = torch.randn(4, 2, generator=g, dtype=DTYPE)
    outside = torch.tensor([0.0, 0.05, 0.95, 1.0], dtype=DTYPE)
    clamped = torch.tensor([0.1, 0.1, 0.9, 0.9], dtype=DTYPE)
    for convert in (
        path.score_to_velocity,
        path.velocity_to_score,
        path.score_to_noise,
        path.noise_to_score,
        path.score_to_denoiser,
    ):
        out = convert(s, x, outside)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, convert(s, x, clamped), rtol=0, atol=0)
    torch.testing.assert_close(path.clamp_time(outside), clamped, rtol=0, atol=0)


def test_to_velocity_and_score_unknown_prediction_raises():
    path = GaussianConditionalPath("linear")
    x = torch.zeros(2, 2, dtype=DTYPE)
    with pytest.raises(UsageError):
        path.to_velocity_and_score(x, "denoiser", x, torch.full((2,), 0.5, dtype=DTYPE))


# -- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t_min, t_max",
    [(-0.1, 0.9), (0.5, 0.5), (0.6, 0.4), (0.0, 1.1), (1.0, 1.0), (-1.0, 2.0)],
)
def test_bad_time_range_raises(t_min, t_max):
    with pytest.raises(UsageError):
        GaussianConditionalPath("linear", t_min=t_min, t_max=t_max)


@pytest.mark.parametrize("t_min, t_max", [(0.0, 1.0), (1e-3, 0.999), (0.2, 0.3)])
def test_good_time_range_accepted(t_min, t_max):
    path = GaussianConditionalPath("cosine", t_min=t_min, t_max=t_max)
    assert (path.t_min, path.t_max) == (t_min, t_max)


def test_unknown_schedule_raises():
    with pytest.raises(UsageError):
        GaussianConditionalPath("quadratic")
