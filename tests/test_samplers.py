"""Samplers driven by exact Gaussian-mixture fields: they must reproduce the target, converge at
their order, keep the marginals (SDE), and report the NFE they use (MATH.md, "Simulation")."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.fields import Field
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import (
    SAMPLERS,
    EulerMaruyamaSampler,
    EulerSampler,
    FixedGridSampler,
    HeunSampler,
    MidpointSampler,
    PowerGrid,
    RK4Sampler,
    Sampler,
    get_sampler,
)
from flowdiff.schedules import SCHEDULES
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)
DTYPE = torch.float64
# The ODE and SDE solvers of a velocity field; meanflow jumps along an average velocity (its tests:
# test_meanflow.py).
FIXED_GRID = sorted(
    n for n, cls in SAMPLERS.items() if issubclass(cls, FixedGridSampler) and n != "meanflow"
)


# A 2D mixture with distinct weights, means and stds, well separated.
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.5], [0.0, 4.0]], dtype=DTYPE)
STDS = torch.tensor([0.5, 0.8, 0.3], dtype=DTYPE)


def exact_path(name):
    """The mixture field is finite on all of [0, 1]: no clamping needed."""
    return GaussianConditionalPath(name, t_min=0.0, t_max=1.0)


def gaussian_field(name, mu=(1.0, -2.0), s=0.7):
    mean = torch.tensor([mu], dtype=DTYPE)
    return GaussianMixtureField(exact_path(name), [1.0], mean, [s]), mean[0], s


class CountingField(Field):
    """Wraps a field and records the time of every evaluation (one NFE each)."""

    def __init__(self, inner: Field):
        self.inner, self.path, self.times = inner, inner.path, []

    def _record(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        self.times.append(float(t.reshape(-1)[0]))

    def velocity(self, x, t):
        self._record(x, t)
        return self.inner.velocity(x, t)

    def velocity_and_score(self, x, t):
        self._record(x, t)
        return self.inner.velocity_and_score(x, t)


SAMPLER_CASES = [
    pytest.param(lambda: EulerSampler(100), id="euler"),
    pytest.param(lambda: HeunSampler(50), id="heun"),
    pytest.param(lambda: EulerMaruyamaSampler(200, sigma_schedule="beta"), id="em-beta"),
    pytest.param(lambda: EulerMaruyamaSampler(200, sigma_schedule="constant"), id="em-constant"),
]


# -- the mixture is reproduced ---------------------------------------------------------------------


@pytest.mark.parametrize("make_sampler", SAMPLER_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_sampler_reproduces_mixture(name, make_sampler):
    field = GaussianMixtureField(exact_path(name), WEIGHTS, MEANS, STDS)
    sampler = make_sampler()
    g = torch.Generator().manual_seed(0)
    n = 4000
    x0 = torch.randn(n, 2, generator=g, dtype=DTYPE)
    x = sampler.sample(field, x0, generator=g).x
    assert x.shape == x0.shape and torch.isfinite(x).all()
    # Assign each sample to the component of largest posterior weight under p_data.
    log_joint = (
        torch.log(WEIGHTS)
        - (x[:, None, :] - MEANS).square().sum(-1) / (2 * STDS**2)
        - 2 * torch.log(STDS)
    )
    k = log_joint.argmax(1)
    # Tolerances: 4 Monte Carlo standard errors plus a small allowance for the discretisation.
    for j in range(3):
        w, s = WEIGHTS[j].item(), STDS[j].item()
        sel = x[k == j]
        m = sel.shape[0]
        assert abs(m / n - w) < 4 * math.sqrt(w * (1 - w) / n) + 0.01
        assert (sel.mean(0) - MEANS[j]).abs().max() < 4 * s / math.sqrt(m) + 0.02
        assert (sel.std(0) / s - 1).abs().max() < 4 / math.sqrt(2 * m) + 0.02


# -- convergence order of the ODE solvers ----------------------------------------------------------


def ode_errors(sampler_cls, name, steps_list):
    field, mu, s = gaussian_field(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(256, 2, generator=g, dtype=DTYPE)
    exact = mu + s * x0  # the exact map phi_1(x_0) of one Gaussian, for every schedule
    return [(sampler_cls(n).sample(field, x0).x - exact).abs().max().item() for n in steps_list]


@pytest.mark.parametrize("name", NAMES)
def test_euler_is_first_order(name):
    errors = ode_errors(EulerSampler, name, [10, 100, 1000])
    for coarse, fine in zip(errors, errors[1:], strict=False):
        order = math.log10(coarse / fine)  # per 10x steps
        assert 0.9 < order < 1.1, errors
    assert errors[-1] < 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_heun_is_second_order(name):
    errors = ode_errors(HeunSampler, name, [20, 40, 80, 160])
    for coarse, fine in zip(errors, errors[1:], strict=False):
        order = math.log2(coarse / fine)  # per 2x steps
        assert 1.8 < order < 2.2, errors
    assert errors[-1] < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_heun_beats_euler_at_equal_cost(name):
    euler = ode_errors(EulerSampler, name, [199])[0]
    heun = ode_errors(HeunSampler, name, [100])[0]  # NFE 2 * 100 - 1 = 199
    assert heun < euler / 10


# -- the SDE keeps the marginals -------------------------------------------------------------------


@pytest.mark.parametrize("sigma_schedule, sigma", [("beta", 1.0), ("constant", 1.0), ("beta", 2.0)])
@pytest.mark.parametrize("name", NAMES)
def test_euler_maruyama_keeps_marginals(name, sigma_schedule, sigma):
    field, mu, s = gaussian_field(name, s=0.5)
    steps, n = 200, 20000
    sampler = EulerMaruyamaSampler(steps, sigma=sigma, sigma_schedule=sigma_schedule)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, 2, generator=g, dtype=DTYPE)
    result = sampler.sample(field, x0, return_trajectory=True, generator=g)
    # p_t = N(alpha_t mu, (alpha_t^2 s^2 + beta_t^2) I) at every grid time t = i / steps.
    for i in (steps // 4, steps // 2, steps):
        t = torch.tensor(i / steps, dtype=DTYPE)
        c = field.path.schedule(t)
        mean, std = c.alpha_t * mu, torch.sqrt(c.alpha_t**2 * s**2 + c.beta_t**2)
        x = result.trajectory[i]
        # 5 standard errors plus an O(h) weak-error allowance (h = 1 / steps).
        assert (x.mean(0) - mean).abs().max() < 5 * std / math.sqrt(n) + 2.0 / steps
        assert (x.std(0) - std).abs().max() < 5 * std / math.sqrt(2 * n) + 2.0 / steps
    torch.testing.assert_close(result.trajectory[-1], result.x, rtol=0, atol=0)


def test_euler_maruyama_sigma_schedules():
    path = exact_path("cosine")
    field = GaussianMixtureField(path, [1.0], torch.zeros(1, 2, dtype=DTYPE), [0.5])
    t = torch.tensor(0.3, dtype=DTYPE)
    beta = math.cos(0.5 * math.pi * 0.3)
    sigma_beta = EulerMaruyamaSampler(10, sigma=1.7, sigma_schedule="beta").sigma_t(field, t)
    sigma_const = EulerMaruyamaSampler(10, sigma=1.7, sigma_schedule="constant").sigma_t(field, t)
    assert float(sigma_beta) == pytest.approx(1.7 * beta, rel=1e-12)
    assert float(sigma_const) == pytest.approx(1.7, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_euler_maruyama_without_noise_is_euler(name):
    field = GaussianMixtureField(exact_path(name), WEIGHTS, MEANS, STDS)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    euler = EulerSampler(20).sample(field, x0).x
    for schedule in ("beta", "constant"):
        em = EulerMaruyamaSampler(20, sigma=0.0, sigma_schedule=schedule)
        torch.testing.assert_close(em.sample(field, x0).x, euler, rtol=1e-12, atol=1e-12)


def test_euler_maruyama_last_step_is_noise_free():
    field, _, _ = gaussian_field("linear")
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    one_step = EulerMaruyamaSampler(1, sigma=1.0, sigma_schedule="constant")
    a = one_step.sample(field, x0, generator=torch.Generator().manual_seed(5)).x
    b = one_step.sample(field, x0, generator=torch.Generator().manual_seed(6)).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, x0 + field.velocity(x0, 0.0), rtol=1e-12, atol=1e-12)
    # With more steps the earlier steps are noisy: different seeds give different samples.
    many = EulerMaruyamaSampler(5, sigma=1.0, sigma_schedule="constant")
    c = many.sample(field, x0, generator=torch.Generator().manual_seed(5)).x
    d = many.sample(field, x0, generator=torch.Generator().manual_seed(6)).x
    e = many.sample(field, x0, generator=torch.Generator().manual_seed(5)).x
    assert (c - d).abs().max() > 1e-3
    torch.testing.assert_close(c, e, rtol=0, atol=0)


# -- NFE, time grid, trajectory --------------------------------------------------------------------


NFE = {
    "euler": lambda n: n,
    "heun": lambda n: 2 * n - 1,
    "midpoint": lambda n: 2 * n,
    "rk4": lambda n: 4 * n,
    "euler-maruyama": lambda n: n,
}


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("sampler_name", FIXED_GRID)
def test_nfe_reported_and_used(sampler_name, steps):
    field = CountingField(GaussianMixtureField(exact_path("linear"), WEIGHTS, MEANS, STDS))
    sampler = get_sampler(sampler_name, steps)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    result = sampler.sample(field, x0, generator=torch.Generator().manual_seed(8))
    assert result.nfe == NFE[sampler_name](steps)
    assert len(field.times) == result.nfe


@pytest.mark.parametrize("t_start, t_end", [(0.0, 1.0), (0.25, 0.75)])
@pytest.mark.parametrize("sampler_name", FIXED_GRID)
def test_field_evaluated_on_uniform_grid(sampler_name, t_start, t_end):
    steps = 8
    field = CountingField(GaussianMixtureField(exact_path("cosine"), WEIGHTS, MEANS, STDS))
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    get_sampler(sampler_name, steps).sample(field, x0, t_start, t_end)
    grid = [t_start + (t_end - t_start) * i / steps for i in range(steps + 1)]
    if sampler_name == "heun":  # slopes at both ends of every step but the last (plain Euler)
        expected = [t for i in range(steps - 1) for t in (grid[i], grid[i + 1])] + [grid[-2]]
    elif sampler_name == "midpoint":
        expected = [t for a, b in zip(grid, grid[1:], strict=False) for t in (a, (a + b) / 2)]
    elif sampler_name == "rk4":
        expected = [
            t
            for a, b in zip(grid, grid[1:], strict=False)
            for t in (a, (a + b) / 2, (a + b) / 2, b)
        ]
    else:  # one evaluation at the start of each step: never at t_end
        expected = grid[:-1]
    assert field.times == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_partial_interval_reaches_target(name):
    """Starting at t_start from p_{t_start} (not noise) the ODE still reaches p_data."""
    field, mu, s = gaussian_field(name)
    t0 = 0.4
    c = field.path.schedule(torch.tensor(t0, dtype=DTYPE))
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(10), dtype=DTYPE)
    x_t0 = c.alpha_t * mu + torch.sqrt(c.alpha_t**2 * s**2 + c.beta_t**2) * x0
    x1 = HeunSampler(200).sample(field, x_t0, t0).x
    torch.testing.assert_close(x1, mu + s * x0, rtol=0, atol=1e-3)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
@pytest.mark.parametrize("sampler_name", FIXED_GRID)
def test_trajectory_shape(sampler_name, shape):
    steps, batch = 6, 5
    g = torch.Generator().manual_seed(11)
    means = torch.randn((2, *shape), generator=g, dtype=DTYPE)
    field = GaussianMixtureField(exact_path("linear"), [0.4, 0.6], means, [0.5, 0.9])
    x0 = torch.randn((batch, *shape), generator=g, dtype=DTYPE)
    sampler = get_sampler(sampler_name, steps)
    result = sampler.sample(field, x0, return_trajectory=True, generator=g)
    assert result.trajectory.shape == (steps + 1, batch, *shape)
    assert result.x.shape == (batch, *shape)
    torch.testing.assert_close(result.trajectory[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(result.trajectory[-1], result.x, rtol=0, atol=0)
    assert sampler.sample(field, x0, generator=g).trajectory is None
    if sampler_name == "euler":
        h = 1.0 / steps
        first = x0 + h * field.velocity(x0, torch.zeros(batch, dtype=DTYPE))
        torch.testing.assert_close(result.trajectory[1], first, rtol=1e-12, atol=1e-12)


def test_euler_step_on_image_shapes_matches_points():
    """The samplers are shape-agnostic: an image batch evolves like its flattened points."""
    g = torch.Generator().manual_seed(12)
    means = torch.randn(2, 1, 2, 2, generator=g, dtype=DTYPE)
    path = exact_path("cosine")
    img = GaussianMixtureField(path, [0.3, 0.7], means, [0.6, 0.4])
    pts = GaussianMixtureField(path, [0.3, 0.7], means.flatten(1), [0.6, 0.4])
    x0 = torch.randn(5, 1, 2, 2, generator=g, dtype=DTYPE)
    for sampler in (EulerSampler(10), HeunSampler(10)):
        a = sampler.sample(img, x0).x
        b = sampler.sample(pts, x0.flatten(1)).x
        torch.testing.assert_close(a.flatten(1), b, rtol=1e-12, atol=1e-12)


# -- construction errors ---------------------------------------------------------------------------


def test_registry():
    assert set(SAMPLERS) == {
        "euler", "heun", "midpoint", "rk4", "euler-maruyama", "dopri5", "meanflow"
    }  # fmt: skip
    assert FIXED_GRID == ["euler", "euler-maruyama", "heun", "midpoint", "rk4"]
    for name, cls in SAMPLERS.items():
        assert issubclass(cls, Sampler) and cls.name == name
    for name in FIXED_GRID:
        sampler = get_sampler(name, 12)
        assert isinstance(sampler, SAMPLERS[name]) and sampler.steps == 12
        assert get_sampler(name).steps == 100


def test_names_class_names_and_class_paths_are_one_system():
    for name in (
        "heun",
        "HeunSampler",
        "flowdiff.samplers.HeunSampler",
        "flowdiff.samplers.ode.HeunSampler",
    ):
        assert type(get_sampler(name, 3)) is HeunSampler
    em = get_sampler("EulerMaruyamaSampler", 7, sigma=0.5)
    assert repr(em) == "EulerMaruyamaSampler(steps=7, sigma=0.5, sigma_schedule='beta')"


@pytest.mark.parametrize("bad", ["rk5", "Euler", "", "euler_maruyama", "torch.nn.Linear"])
def test_get_sampler_unknown_name_raises(bad):
    with pytest.raises(UsageError) as info:
        get_sampler(bad)
    for name in SAMPLERS:
        assert name in str(info.value)


@pytest.mark.parametrize("steps", [0, -1, -100])
@pytest.mark.parametrize("sampler_name", FIXED_GRID)
def test_nonpositive_steps_raise(sampler_name, steps):
    with pytest.raises(UsageError):
        get_sampler(sampler_name, steps)
    with pytest.raises(UsageError):
        SAMPLERS[sampler_name](steps)


def test_bad_sampler_options_raise():
    with pytest.raises(UsageError, match="sigma"):
        get_sampler("euler", 10, sigma=1.0)
    with pytest.raises(UsageError):
        get_sampler("heun", 10, sigma_schedule="beta")
    with pytest.raises(UsageError):
        get_sampler("euler-maruyama", 10, sigma=-1.0)
    with pytest.raises(UsageError):
        get_sampler("euler-maruyama", 10, sigma=float("inf"))
    with pytest.raises(UsageError):
        get_sampler("euler-maruyama", 10, sigma_schedule="linear")
    em = get_sampler("euler-maruyama", 10, sigma=0.5, sigma_schedule="constant")
    assert (em.sigma, em.sigma_schedule) == (0.5, "constant")


# -- higher-order solvers, time grids, the SDE's stability -----------------------------------------


def mixture_errors(sampler_cls, name, steps_list):
    """Errors against a reference solution (RK4, 4096 steps) on the mixture, whose field is not
    affine in x (on one Gaussian some schedules make low-order methods exact by accident)."""
    field = GaussianMixtureField(exact_path(name), WEIGHTS, MEANS, STDS)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    reference = RK4Sampler(1024).sample(field, x0).x
    return [(sampler_cls(n).sample(field, x0).x - reference).abs().max().item() for n in steps_list]


@pytest.mark.parametrize("name", NAMES)
def test_midpoint_is_second_order(name):
    errors = mixture_errors(MidpointSampler, name, [40, 80, 160])
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 1.7 < math.log2(coarse / fine) < 2.3, errors


@pytest.mark.parametrize("name", ["linear", "cosine"])  # sqrt: d_beta_t is infinite at t = 1
def test_rk4_is_fourth_order(name):
    errors = mixture_errors(RK4Sampler, name, [32, 64, 128])
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.6 < math.log2(coarse / fine) < 4.4, errors


def test_power_grid_places_small_steps_at_the_start():
    field = CountingField(GaussianMixtureField(exact_path("linear"), WEIGHTS, MEANS, STDS))
    x0 = torch.zeros(2, 2, dtype=DTYPE)
    EulerSampler(4, PowerGrid(2.0)).sample(field, x0, 1.0, 0.2)
    expected = [1.0 - 0.8 * (i / 4) ** 2 for i in range(4)]
    assert field.times == pytest.approx(expected, abs=1e-12)
    with pytest.raises(UsageError):
        PowerGrid(0.5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_euler_maruyama_constant_sigma_is_stable_on_a_concentrated_target(name):
    """sigma_t = sigma near t = 1 is a stiff term sigma^2 / (2 beta_t^2): explicit Euler on it
    blew deviations from the data up ~170x at h = 0.01. More steps must not hurt."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=DTYPE)
    stds = [0.02, 0.05]
    field = GaussianMixtureField(exact_path(name), [0.5, 0.5], means, stds)
    errors = []
    for steps in (100, 400):
        g = torch.Generator().manual_seed(13)
        x0 = torch.randn(2000, 2, generator=g, dtype=DTYPE)
        sampler = EulerMaruyamaSampler(steps, sigma=1.0, sigma_schedule="constant")
        x = sampler.sample(field, x0, generator=g).x
        assert torch.isfinite(x).all()
        nearest = (x[:, None] - means).norm(dim=-1).min(1).values
        errors.append(nearest.square().mean().sqrt().item())  # RMS distance to the components
    # The data's own RMS distance to the nearest mean is about 0.05; more steps do not hurt.
    assert errors[0] < 0.2 and errors[1] < 0.1, errors
    assert errors[1] <= errors[0] * 1.1, errors
