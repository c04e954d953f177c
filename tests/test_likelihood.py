"""ODE log-likelihoods against closed forms: the exact Gaussian-mixture field must give the analytic
mixture log-density, converge at RK4's order, Hutchinson must be unbiased (and exact where the
Jacobian is isotropic), and bits/dim must follow the change of variables (MATH.md, "Likelihood")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowdiff.fields import Field, ModelField
from flowdiff.likelihood import LikelihoodResult, log_likelihood
from flowdiff.metrics.pixels import PIXEL_SCALE, bits_per_dim, dequantize
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import PowerGrid, RK4Sampler
from flowdiff.schedules import SCHEDULES
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)
DTYPE = torch.float64

MIXTURES = {
    "three": (
        torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE),
        torch.tensor([[-3.0, 0.0], [3.0, 0.5], [0.0, 4.0]], dtype=DTYPE),
        torch.tensor([0.5, 0.8, 0.3], dtype=DTYPE),
    ),
    "two": (
        torch.tensor([0.6, 0.4], dtype=DTYPE),
        torch.tensor([[-1.5, 0.5], [1.0, -1.0]], dtype=DTYPE),
        torch.tensor([0.6, 0.9], dtype=DTYPE),
    ),
}


def exact_path(name):
    """The mixture field is finite on all of [0, 1]: the prior N(0, I) is exact at t = 0."""
    return GaussianConditionalPath(name, t_min=0.0, t_max=1.0)


def mixture_field(name, mixture):
    return GaussianMixtureField(exact_path(name), *MIXTURES[mixture])


def gaussian_log_prob(x, mu, s):
    """``log N(x; mu, s^2 I)`` summed over all but the batch dimension, written out by hand."""
    d = x[0].numel()
    return -0.5 * ((x - mu) / s).flatten(1).square().sum(1) - d * math.log(
        s * math.sqrt(2 * math.pi)
    )


class CountingField(Field):
    """Wraps a field and records the time of every velocity evaluation (one NFE each)."""

    def __init__(self, inner: Field):
        self.inner, self.path, self.times = inner, inner.path, []

    def velocity(self, x, t):
        self.times.append(float(t.reshape(-1)[0]))
        return self.inner.velocity(x, t)


# -- the exact field gives the analytic mixture log-density ----------------------------------------


@pytest.mark.parametrize("mixture", sorted(MIXTURES))
@pytest.mark.parametrize("name", NAMES)
def test_exact_divergence_gives_mixture_log_density(name, mixture):
    field = mixture_field(name, mixture)
    x, _ = field.sample(64, generator=torch.Generator().manual_seed(0))
    result = log_likelihood(field, x, solver=RK4Sampler(64), t_start=0.0)
    assert isinstance(result, LikelihoodResult)
    assert result.log_prob.shape == (64,) and result.log_prob.dtype == DTYPE
    assert result.x_0.shape == x.shape and result.nfe == 4 * 64
    # RK4's error is C h^4 (next test); at h = 1/64 (h^4 = 6e-8) and with these mixtures' field
    # derivatives of order 100 it is ~1e-5 nats: 1e-4 leaves a margin and still fails for a
    # second-order scheme (error ~ 1e-2 at this budget) or a sign slip (errors of order 1).
    torch.testing.assert_close(result.log_prob, field.log_prob(x, 1.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("power", [2.0, 3.0])
@pytest.mark.parametrize("name", NAMES)
def test_graded_grid_gives_mixture_log_density(name, power):
    """A grid whose steps shrink towards t = 1 is still RK4 on every step: the same accuracy."""
    field = mixture_field(name, "three")
    x, _ = field.sample(64, generator=torch.Generator().manual_seed(0))
    result = log_likelihood(field, x, solver=RK4Sampler(64, PowerGrid(power)), t_start=0.0)
    torch.testing.assert_close(result.log_prob, field.log_prob(x, 1.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_error_falls_at_fourth_order(name):
    field = mixture_field(name, "two")
    x, _ = field.sample(32, generator=torch.Generator().manual_seed(1))
    exact = field.log_prob(x, 1.0)
    errors = [
        (log_likelihood(field, x, solver=RK4Sampler(n), t_start=0.0).log_prob - exact)
        .abs()
        .max()
        .item()
        for n in (16, 32, 64, 128)
    ]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        order = math.log2(coarse / fine)  # per 2x steps
        assert 3.6 < order < 4.6, errors
    assert errors[-1] < 1e-7


def test_x_0_is_the_inverse_flow_of_one_gaussian():
    """For one Gaussian the flow is ``phi_1(x_0) = mu + s x_0``: the backward ODE inverts it."""
    mu, s = torch.tensor([[1.0, -2.0]], dtype=DTYPE), 0.7
    field = GaussianMixtureField(exact_path("cosine"), [1.0], mu, [s])
    x = mu + s * torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    steps = 32
    result = log_likelihood(field, x, solver=RK4Sampler(steps), t_start=0.0)
    tol = (1 / steps) ** 4  # RK4: C h^4 with C of order 1 for this smooth 2D field
    torch.testing.assert_close(result.x_0, (x - mu) / s, rtol=0, atol=tol)
    torch.testing.assert_close(result.log_prob, gaussian_log_prob(x, mu, s), rtol=0, atol=tol)


def test_partial_interval_gives_log_p_t():
    """Started from ``N(0, I)`` at t = 0 and stopped at ``t_end``, it gives ``log p_{t_end}``."""
    field = mixture_field("linear", "two")
    t_end = 0.6
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    result = log_likelihood(field, x, solver=RK4Sampler(64), t_start=0.0, t_end=t_end)
    torch.testing.assert_close(result.log_prob, field.log_prob(x, t_end), rtol=0, atol=1e-6)


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_evaluations_on_the_rk4_grid_backward_in_time(power):
    steps, t_start, t_end = 5, 0.2, 0.9
    field = CountingField(mixture_field("cosine", "three"))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    result = log_likelihood(
        field, x, solver=RK4Sampler(steps, PowerGrid(power)), t_start=t_start, t_end=t_end
    )
    grid = [t_end + (t_start - t_end) * (i / steps) ** power for i in range(steps + 1)]
    expected = []
    for t, t_next in zip(grid, grid[1:], strict=False):
        expected += [t, (t + t_next) / 2, (t + t_next) / 2, t_next]
    assert result.nfe == len(field.times) == 4 * steps
    assert field.times == pytest.approx(expected, abs=1e-12)


def test_t_start_defaults_to_path_t_min():
    path = GaussianConditionalPath("linear", t_min=0.05, t_max=0.95)
    field = CountingField(GaussianMixtureField(path, *MIXTURES["two"]))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    log_likelihood(field, x, solver=RK4Sampler(3))
    assert field.times[0] == pytest.approx(1.0) and field.times[-1] == pytest.approx(0.05)


# -- a network through ModelField ------------------------------------------------------------------


class LinearVelocityNet(nn.Module):
    """``net(x, t) = A x``: the flow is ``x_t = expm(A t) x_0`` and ``div u = trace(A)``.

    RK4 on ``dx/dt = A x`` with step ``h`` multiplies by the degree-4 Taylor polynomial of
    ``expm(h A)``, and integrates the constant divergence exactly: its output is known in closed
    form to rounding, not just to the discretisation error.
    """

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x, t, y=None):
        return x @ self.a.T


def test_model_field_against_linear_flow():
    g = torch.Generator().manual_seed(6)
    a = 0.5 * torch.randn(3, 3, generator=g, dtype=DTYPE)
    path = GaussianConditionalPath("linear")  # t_min = 1e-3: the default t_start
    field = ModelField(LinearVelocityNet(a), path, "velocity")
    x = torch.randn(8, 3, generator=g, dtype=DTYPE)
    steps, duration = 16, 1.0 - path.t_min
    with torch.no_grad():  # the divergence needs autograd all the same
        result = log_likelihood(field, x, solver=RK4Sampler(steps))
    # The RK4 map, backward (h < 0), applied ``steps`` times.
    m = -a * duration / steps
    one_step = sum(torch.linalg.matrix_power(m, k) / math.factorial(k) for k in range(5))
    x_0_rk4 = x @ torch.linalg.matrix_power(one_step, steps).T
    log_prob_rk4 = gaussian_log_prob(x_0_rk4, 0.0, 1.0) - torch.trace(a) * duration
    torch.testing.assert_close(result.x_0, x_0_rk4, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.log_prob, log_prob_rk4, rtol=0, atol=1e-12)
    # And the exact flow, to RK4's accuracy: |h A|^5 / 120 per step (|A| = 1.5 here) ~ 2e-8 in all.
    x_0 = x @ torch.linalg.matrix_exp(-a * duration).T
    torch.testing.assert_close(result.x_0, x_0, rtol=0, atol=1e-5)
    assert field.net.a.grad is None  # parameters are left alone


def test_same_result_under_no_grad_and_inference_mode():
    field = mixture_field("linear", "three")
    x, _ = field.sample(8, generator=torch.Generator().manual_seed(7))
    free = log_likelihood(field, x, solver=RK4Sampler(4), t_start=0.0).log_prob
    with torch.no_grad():
        no_grad = log_likelihood(field, x, solver=RK4Sampler(4), t_start=0.0).log_prob
    with torch.inference_mode():
        x_inference = x.clone()
        inference = log_likelihood(field, x_inference, solver=RK4Sampler(4), t_start=0.0).log_prob
    torch.testing.assert_close(no_grad, free, rtol=0, atol=0)
    torch.testing.assert_close(inference, free, rtol=0, atol=0)


def test_float32_images_keep_their_dtype():
    field32 = GaussianMixtureField(exact_path("linear"), [1.0], torch.zeros(1, 1, 3, 3), [0.5])
    x = 0.5 * torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(16))
    result = log_likelihood(field32, x, solver=RK4Sampler(16), t_start=0.0, divergence="hutchinson")
    assert result.log_prob.dtype == result.x_0.dtype == torch.float32
    expected = gaussian_log_prob(x.double(), 0.0, 0.5).float()
    torch.testing.assert_close(result.log_prob, expected, rtol=1e-5, atol=1e-4)


# -- Hutchinson ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rademacher_exact_for_isotropic_gaussian(name):
    """One Gaussian: ``u`` is affine in x with Jacobian ``a(t) I``, so ``v^T J v = a(t) D``."""
    g = torch.Generator().manual_seed(8)
    mu, s = torch.randn(1, 1, 4, 4, generator=g, dtype=DTYPE), 0.6
    field = GaussianMixtureField(exact_path(name), [1.0], mu, [s])
    x = mu + s * torch.randn(6, 1, 4, 4, generator=g, dtype=DTYPE)
    steps, d = 32, 16
    exact = log_likelihood(field, x, solver=RK4Sampler(steps), t_start=0.0)
    hutch = log_likelihood(
        field, x, solver=RK4Sampler(steps), t_start=0.0, divergence="hutchinson", generator=g
    )
    torch.testing.assert_close(hutch.log_prob, exact.log_prob, rtol=0, atol=1e-10)
    # RK4: C h^4 with C of order D (the divergence is D times a smooth function of t).
    tol = d / steps**4
    torch.testing.assert_close(hutch.log_prob, gaussian_log_prob(x, mu[0], s), rtol=0, atol=tol)
    # channels_last images give the same answer.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    hutch_cl = log_likelihood(
        field, x_cl, solver=RK4Sampler(steps), t_start=0.0, divergence="hutchinson"
    )
    torch.testing.assert_close(hutch_cl.log_prob, exact.log_prob, rtol=0, atol=1e-10)
    torch.testing.assert_close(hutch_cl.x_0, exact.x_0, rtol=0, atol=1e-12)


def nonisotropic_case(rows):
    """One point between two components, repeated: each row gets its own probes."""
    means = torch.tensor([[-1.0, 0.5, 0.0, 1.0], [1.0, -0.5, 0.5, 0.0]], dtype=DTYPE)
    field = GaussianMixtureField(
        exact_path("linear"), [0.5, 0.5], means.reshape(2, 1, 2, 2), [0.4, 1.2]
    )
    x = torch.tensor([0.1, 0.0, 0.3, 0.4], dtype=DTYPE).reshape(1, 1, 2, 2).expand(rows, 1, 2, 2)
    return field, x


def hutchinson_rows(steps, probes=1, distribution="rademacher", rows=512, seed=9):
    field, x = nonisotropic_case(rows)
    g = torch.Generator().manual_seed(seed)
    result = log_likelihood(
        field,
        x,
        solver=RK4Sampler(steps),
        t_start=0.0,
        divergence="hutchinson",
        probes=probes,
        generator=g,
        probe_distribution=distribution,
    )
    return result.log_prob


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_for_nonisotropic_jacobian(distribution):
    """The mean over probes is the exact-divergence result on the same grid (not just near it)."""
    steps = 8
    field, x = nonisotropic_case(1)
    exact = log_likelihood(field, x, solver=RK4Sampler(steps), t_start=0.0).log_prob[0]
    estimates = hutchinson_rows(steps, distribution=distribution)
    std = estimates.std()
    assert std > 1e-2  # the Jacobian is not isotropic: single probes do scatter
    assert abs(estimates.mean() - exact) < 4 * std / math.sqrt(len(estimates))


def test_hutchinson_variance_falls_with_steps_and_probes():
    """Probes drawn afresh at each evaluation: Var ~ 1 / steps; averaging P probes: Var / P."""
    coarse, fine = hutchinson_rows(4).std(), hutchinson_rows(32).std()
    assert coarse / fine > 2.0  # sqrt(8) = 2.8 expected; a probe fixed per sample gives ~1
    single, many = hutchinson_rows(8).std(), hutchinson_rows(8, probes=16).std()
    assert 3.2 < single / many < 5.0  # sqrt(16) = 4; 512 rows put each std within ~3%


def test_seeded_probes_reproducible():
    a = hutchinson_rows(4, rows=8, seed=10)
    b = hutchinson_rows(4, rows=8, seed=10)
    c = hutchinson_rows(4, rows=8, seed=11)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-6


# -- dequantisation and bits per dimension ---------------------------------------------------------


def test_bits_per_dim_of_gaussian_model():
    """A model whose density at t = 1 is exactly ``N(mu, s^2 I)``, on dequantised 8-bit images."""
    g = torch.Generator().manual_seed(12)
    pixels = torch.randint(0, 256, (5, 1, 4, 4), generator=g, dtype=torch.uint8)
    mu, s = torch.linspace(-0.8, 0.8, 16, dtype=DTYPE).reshape(1, 1, 4, 4), 0.5
    field = GaussianMixtureField(exact_path("linear"), [1.0], mu, [s])
    x = dequantize(pixels, torch.Generator().manual_seed(13), dtype=DTYPE)
    # The same noise, drawn by hand: x = (v + u - 1/2) / 127.5 - 1.
    u = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(13), dtype=DTYPE)
    torch.testing.assert_close(x, (pixels.to(DTYPE) + u - 0.5) / 127.5 - 1, rtol=0, atol=1e-15)
    steps, d = 32, 16
    log_prob = log_likelihood(
        field, x, solver=RK4Sampler(steps), t_start=0.0, divergence="hutchinson"
    ).log_prob
    bpd = bits_per_dim(log_prob, d)
    normal = torch.distributions.Normal(mu[0], s)
    expected = (-normal.log_prob(x).flatten(1).sum(1) - d * math.log(1 / 127.5)) / (d * math.log(2))
    # An error of D h^4 nats in log p (as above) is h^4 / ln 2 bits per dimension.
    torch.testing.assert_close(bpd, expected, rtol=0, atol=steps**-4 / math.log(2))


def test_uniform_model_has_eight_bits_per_dim():
    """Uniform on the dequantised range ``[-1 - h/2, 1 + h/2)^D`` (h = 1/127.5, 256 levels of
    width h) spends exactly 8 bits per dimension."""
    d = 784
    log_prob = torch.full((3,), -d * math.log(256 * PIXEL_SCALE), dtype=DTYPE)
    torch.testing.assert_close(bits_per_dim(log_prob, d), torch.full_like(log_prob, 8.0))
    # Another pixel range: the same model on [0, 1] (scale 1/255) is also 8 bits.
    log_prob = torch.full((3,), -d * math.log(256 / 255), dtype=DTYPE)
    torch.testing.assert_close(bits_per_dim(log_prob, d, 1 / 255), torch.full_like(log_prob, 8.0))


def test_dequantize_range_and_mean():
    from flowdiff.data.mnist import pixels_to_float

    n = 4000
    levels = torch.arange(256, dtype=torch.uint8)
    pixels = levels.repeat(n, 1)  # (n, 256)
    x = dequantize(pixels, torch.Generator().manual_seed(14), dtype=DTYPE)
    half = 0.5 / 127.5
    assert x.dtype == DTYPE and x.shape == pixels.shape
    assert x[:, 0].min() >= -1 - half and x[:, 0].max() < -1 + half
    assert x[:, 255].min() >= 1 - half and x[:, 255].max() < 1 + half
    # Each pixel's noise is centred on its training value; u has std 1/sqrt(12).
    se = 2 * half / math.sqrt(12 * n)
    centre = pixels_to_float(levels).to(DTYPE)
    assert (x.mean(0) - centre).abs().max() < 4.5 * se
    assert dequantize(pixels[:2]).dtype == torch.float32
    a = dequantize(pixels[:2], torch.Generator().manual_seed(15))
    b = dequantize(pixels[:2], torch.Generator().manual_seed(15))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver": "rk4"},
        {"divergence": "trace"},
        {"divergence": "hutchinson", "probes": 0},
        {"divergence": "hutchinson", "probe_distribution": "uniform"},
        {"t_start": 0.5, "t_end": 0.5},
        {"t_start": -0.1},
        {"t_end": 1.5},
    ],
)
def test_bad_arguments_raise(kwargs):
    field = mixture_field("linear", "two")
    x = torch.zeros(2, 2, dtype=DTYPE)
    with pytest.raises(UsageError):
        log_likelihood(field, x, **kwargs)


def test_bad_inputs_raise():
    field = mixture_field("linear", "two")
    with pytest.raises(UsageError):
        log_likelihood(field, torch.zeros(2, dtype=DTYPE))  # no batch dimension
    with pytest.raises(UsageError):
        dequantize(torch.zeros(2, 3))  # already floats
    with pytest.raises(UsageError):
        bits_per_dim(torch.zeros(2), 0)
    with pytest.raises(UsageError):
        bits_per_dim(torch.zeros(2), 4, scale=0.0)
