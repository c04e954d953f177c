"""The adaptive dopri5 sampler against closed forms: the exact flow of one Gaussian
(``phi_t(x_0) = alpha_t mu + sqrt(alpha_t^2 s^2 + beta_t^2) x_0``, MATH.md), the mixture's
log-density through the likelihood, and an NFE that is the field's own count of its calls."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.fields import Field
from flowdiff.likelihood import log_likelihood
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import (
    Dopri5Sampler,
    EulerSampler,
    RK4Sampler,
    get_sampler,
    sampler_class,
    with_args,
)
from flowdiff.samplers.adaptive import per_sample_rms
from flowdiff.schedules import SCHEDULES
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)
DTYPE = torch.float64
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.5], [0.0, 4.0]], dtype=DTYPE)
STDS = torch.tensor([0.5, 0.8, 0.3], dtype=DTYPE)


def exact_path(name):
    return GaussianConditionalPath(name, t_min=0.0, t_max=1.0)


def gaussian(name, mu=(1.0, -2.0), s=0.7):
    mean = torch.tensor([mu], dtype=DTYPE)
    return GaussianMixtureField(exact_path(name), [1.0], mean, [s]), mean[0], s


def exact_flow(field, mu, s, x_0, t):
    """The exact ODE flow of one Gaussian from noise: ``alpha_t mu + sqrt(alpha_t^2 s^2 +
    beta_t^2) x_0``."""
    c = field.path.schedule(torch.as_tensor(t, dtype=DTYPE))
    return c.alpha_t * mu + torch.sqrt(c.alpha_t**2 * s**2 + c.beta_t**2) * x_0


class Recording(Field):
    """Wraps a field and records the time of every evaluation (one NFE each)."""

    def __init__(self, inner: Field):
        self.inner, self.path, self.times = inner, inner.path, []

    def velocity(self, x, t):
        self.times.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return self.inner.velocity(x, t)


def noise(n=256, seed=1, shape=(2,)):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- accuracy and the NFE --------------------------------------------------------------------------


@pytest.mark.parametrize("tol", [1e-5, 1e-7])
@pytest.mark.parametrize("name", NAMES)
def test_dopri5_reaches_the_exact_endpoint_within_its_tolerance(name, tol):
    field, mu, s = gaussian(name)
    recorded = Recording(field)
    x_0 = noise()
    result = Dopri5Sampler(atol=tol, rtol=tol).sample(recorded, x_0)
    # Local errors of at most tol a step add up to a global error of a few tol (measured: 0.4 to
    # 2.8 tol); a fixed 10 tol still fails for a 4th-order method run at this NFE.
    error = (result.x - exact_flow(field, mu, s, x_0, 1.0)).abs().max().item()
    assert error < 10 * tol
    # The NFE is the field's count: 2 to choose the first step, then 6 a step (accepted or not).
    assert result.nfe == len(recorded.times) and (result.nfe - 2) % 6 == 0
    # Never evaluated outside [0, 1] (at t > 1 the sqrt schedule's beta_t is not even defined).
    assert min(recorded.times) == 0.0 and max(recorded.times) <= 1.0
    assert result.trajectory is None


@pytest.mark.parametrize("name", NAMES)
def test_tighter_tolerance_costs_more_and_errs_less(name):
    field, mu, s = gaussian(name)
    x_0 = noise()
    exact = exact_flow(field, mu, s, x_0, 1.0)
    loose = Dopri5Sampler(1e-4, 1e-4).sample(field, x_0)
    tight = Dopri5Sampler(1e-8, 1e-8).sample(field, x_0)
    assert tight.nfe > loose.nfe
    assert (tight.x - exact).abs().max() < (loose.x - exact).abs().max() / 100


def test_dopri5_on_the_mixture_matches_a_fine_rk4_solution():
    """The mixture's field is not affine in x: the answer is RK4 with 512 steps (error ~1e-9)."""
    field = GaussianMixtureField(exact_path("cosine"), WEIGHTS, MEANS, STDS)
    x_0 = noise()
    reference = RK4Sampler(512).sample(field, x_0).x
    result = Dopri5Sampler(1e-7, 1e-7).sample(field, x_0)
    assert (result.x - reference).abs().max() < 1e-6
    assert result.nfe < 4 * 512 / 4  # a quarter of RK4's NFE or less


@pytest.mark.parametrize("name", NAMES)
def test_backward_and_partial_intervals(name):
    """From t = 1 back to 0.3 the exact flow inverts; no evaluation leaves [0.3, 1]."""
    field, mu, s = gaussian(name)
    recorded = Recording(field)
    x_0 = noise(64)
    x_1 = exact_flow(field, mu, s, x_0, 1.0)
    result = Dopri5Sampler(1e-8, 1e-8).sample(recorded, x_1, 1.0, 0.3)
    torch.testing.assert_close(result.x, exact_flow(field, mu, s, x_0, 0.3), rtol=0, atol=1e-6)
    assert 0.3 <= min(recorded.times) and max(recorded.times) == 1.0


@pytest.mark.parametrize("shape", [(2,), (1, 3, 3)])
def test_trajectory_at_evenly_spaced_times(shape):
    """The states at 101 evenly spaced times, from the solver's dense output: no extra NFE."""
    g = torch.Generator().manual_seed(2)
    mu = torch.randn((1, *shape), generator=g, dtype=DTYPE)
    field = GaussianMixtureField(exact_path("linear"), [1.0], mu, [0.6])
    x_0 = noise(5, shape=shape)
    sampler = Dopri5Sampler(1e-8, 1e-8)
    result = sampler.sample(field, x_0, 0.2, 0.9, return_trajectory=True)
    plain = sampler.sample(field, x_0, 0.2, 0.9)
    assert result.trajectory.shape == (101, 5, *shape) and result.nfe == plain.nfe
    torch.testing.assert_close(result.trajectory[0], x_0, rtol=0, atol=0)
    torch.testing.assert_close(result.trajectory[-1], result.x, rtol=0, atol=0)
    torch.testing.assert_close(result.x, plain.x, rtol=0, atol=1e-12)
    # x_0 is at t = 0.2 here: the flow from t = 0 of the noise that reaches it.
    z = (x_0 - exact_flow(field, mu[0], 0.6, torch.zeros_like(x_0), 0.2)) / math.sqrt(
        0.2**2 * 0.36 + 0.8**2
    )
    for k in (0, 37, 100):
        t = 0.2 + 0.7 * k / 100
        expected = exact_flow(field, mu[0], 0.6, z, t)
        torch.testing.assert_close(result.trajectory[k], expected, rtol=0, atol=1e-6)


def test_a_batch_takes_the_steps_of_its_hardest_sample():
    """The error norm is per sample (the largest RMS over each sample's coordinates): a sample
    far out in a batch of near ones is solved exactly as if alone, not diluted by the batch."""
    field, mu, s = gaussian("linear")
    x_0 = 0.01 * noise(255)
    far = torch.tensor([[40.0, -30.0]], dtype=DTYPE)
    sampler = Dopri5Sampler(atol=1e-6, rtol=1e-12)
    batch = sampler.sample(field, torch.cat([x_0, far]))
    alone = sampler.sample(field, far)
    assert batch.nfe == alone.nfe
    torch.testing.assert_close(batch.x[-1:], alone.x, rtol=0, atol=1e-12)
    assert (alone.x - exact_flow(field, mu, s, far, 1.0)).abs().max() < 1e-5


def test_per_sample_rms():
    """The max over samples and parts of each part's RMS over a sample's coordinates: the
    log-det's 7 counts in full, not pooled with x's two values as sqrt((0 + 1 + 49) / 3)."""
    e = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert per_sample_rms(e).item() == pytest.approx(math.sqrt(12.5))
    log_det = torch.tensor([0.0, 7.0])
    assert per_sample_rms((e, log_det)).item() == pytest.approx(7.0)
    assert per_sample_rms((e, log_det / 7)).item() == pytest.approx(math.sqrt(12.5))


# -- the likelihood through dopri5 -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_likelihood_through_dopri5_gives_the_mixture_log_density(name):
    field = GaussianMixtureField(exact_path(name), WEIGHTS, MEANS, STDS)
    recorded = Recording(field)
    x, _ = field.sample(64, generator=torch.Generator().manual_seed(0))
    result = log_likelihood(recorded, x, solver=Dopri5Sampler(1e-6, 1e-6), t_start=0.0)
    # measured: 4e-6 to 8e-6 nats at this tolerance
    torch.testing.assert_close(result.log_prob, field.log_prob(x, 1.0), rtol=0, atol=1e-4)
    assert result.nfe == len(recorded.times) and (result.nfe - 2) % 6 == 0
    # torchdiffeq evaluates the last stage of a step just inside its end: here t = 5e-324.
    assert max(recorded.times) == 1.0 and 0.0 <= min(recorded.times) < 1e-300


def test_the_log_densitys_error_follows_the_tolerance():
    """One Gaussian N(mu, 0.1^2 I) in D = 64 dimensions (closed-form log-density): at rtol = atol
    = tol the error of log p stays below 2 tol |log p| over three decades of tol. The log-det is a
    part of the state on its own: pooled with x into one RMS of D + 1 values, its tolerance was
    sqrt(65) ~ 8 times looser, and at tol = 1e-4 the error was 8.6 tol |log p|."""
    d = 64
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, d, generator=g, dtype=DTYPE)
    field = GaussianMixtureField(exact_path("linear"), [1.0], mu, [0.1])
    x, _ = field.sample(8, generator=g)
    exact = field.log_prob(x)
    for tol in (1e-3, 1e-4, 1e-5):
        result = log_likelihood(field, x, solver=Dopri5Sampler(tol, tol), t_start=0.0)
        error = (result.log_prob - exact).abs().max()
        assert error < 2 * tol * exact.abs().max(), (tol, error)


def test_hutchinson_with_dopri5_keeps_its_probes():
    """An adaptive solver needs a deterministic right-hand side: the probes are drawn once. For an
    isotropic Jacobian a Rademacher probe is exact, so the result is the exact divergence's; on
    the mixture, fixed probes cost about what the exact divergence costs."""
    field, _, _ = gaussian("cosine")
    x = noise(16)
    solver = Dopri5Sampler(1e-6, 1e-6)
    exact = log_likelihood(field, x, solver=solver, t_start=0.0)
    g = torch.Generator().manual_seed(3)
    estimate = log_likelihood(field, x, solver=solver, t_start=0.0, divergence="hutchinson",
                              generator=g)  # fmt: skip
    torch.testing.assert_close(estimate.log_prob, exact.log_prob, rtol=0, atol=1e-10)
    assert estimate.nfe == exact.nfe
    mixture = GaussianMixtureField(exact_path("cosine"), WEIGHTS, MEANS, STDS)
    y, _ = mixture.sample(16, generator=torch.Generator().manual_seed(4))
    exact = log_likelihood(mixture, y, solver=solver, t_start=0.0)
    estimate = log_likelihood(mixture, y, solver=solver, t_start=0.0, divergence="hutchinson",
                              generator=g)  # fmt: skip
    assert estimate.nfe < 2 * exact.nfe and torch.isfinite(estimate.log_prob).all()


def test_the_sde_sampler_is_no_likelihood_solver():
    field, _, _ = gaussian("linear")
    with pytest.raises(UsageError, match="ODE solver"):
        log_likelihood(field, noise(2), solver=get_sampler("euler-maruyama", 4))


# -- construction ----------------------------------------------------------------------------------


def test_names_and_defaults():
    assert sampler_class("dopri5") is Dopri5Sampler
    sampler = get_sampler("dopri5", atol=1e-3)
    assert repr(sampler) == "Dopri5Sampler(atol=0.001, rtol=1e-05)"
    assert sampler.label == "dopri5-atol0.001-rtol1e-05" and not hasattr(sampler, "steps")
    assert repr(with_args(EulerSampler(10), "dopri5", rtol=1e-4)) == (
        "Dopri5Sampler(atol=1e-05, rtol=0.0001)"
    )


@pytest.mark.parametrize(
    "kwargs", [{"atol": 0.0}, {"atol": -1e-5}, {"rtol": 0}, {"rtol": float("nan")},
               {"atol": float("inf")}, {"atol": "1e-5"}, {"rtol": True}],
)  # fmt: skip
def test_bad_tolerances_raise(kwargs):
    with pytest.raises(UsageError):
        Dopri5Sampler(**kwargs)


def test_steps_and_grids_are_refused():
    with pytest.raises(UsageError, match="adaptive"):
        get_sampler("dopri5", 10)
    with pytest.raises(UsageError, match="adaptive"):
        with_args(EulerSampler(10), "dopri5", steps=20)
    with pytest.raises(UsageError, match="takes no atol"):
        with_args(Dopri5Sampler(), "heun", atol=1e-3)


def test_a_field_it_cannot_follow_is_an_error_not_an_endless_loop():
    """A right-hand side that changes from call to call never lets the error estimate settle."""

    class Noisy(Field):
        path = exact_path("linear")

        def velocity(self, x, t):
            return torch.randn_like(x)

    class Capped(Dopri5Sampler):
        max_steps = 50

    with pytest.raises(RuntimeError, match="gave up"):
        Capped(1e-6, 1e-6).sample(Noisy(), noise(4))


def test_max_steps_caps_the_whole_solve_with_a_trajectory():
    """With ``return_trajectory`` the solve passes 100 output times; the cap counts the steps of
    the whole solve, not those between two output times (which let 100 times as many through)."""
    field, _, _ = gaussian("cosine")
    x_0 = noise(4)
    free = Dopri5Sampler(1e-10, 1e-10).sample(field, x_0, return_trajectory=True)
    steps = (free.nfe - 2) // 6
    assert steps > 6  # the solve needs more than the cap below

    class Capped(Dopri5Sampler):
        max_steps = steps - 1

    for trajectory in (False, True):
        with pytest.raises(RuntimeError, match="gave up"):
            Capped(1e-10, 1e-10).sample(field, x_0, return_trajectory=trajectory)

    class Enough(Dopri5Sampler):
        max_steps = steps

    assert Enough(1e-10, 1e-10).sample(field, x_0, return_trajectory=True).nfe == free.nfe
