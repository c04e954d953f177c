"""Schedules ``alpha_t, beta_t``: endpoints, monotonicity and exact derivatives (MATH.md)."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.schedules import SCHEDULES, Schedule, get_schedule
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)


# Closed forms of MATH.md's table, written independently of the library.
CLOSED_FORMS = {
    "linear": (lambda t: t, lambda t: 1 - t),
    "sqrt": (lambda t: t, lambda t: torch.sqrt(1 - t)),
    "cosine": (lambda t: torch.sin(0.5 * math.pi * t), lambda t: torch.cos(0.5 * math.pi * t)),
}


def test_registry_holds_the_documented_schedules():
    assert set(SCHEDULES) == set(CLOSED_FORMS)
    for name, cls in SCHEDULES.items():
        assert issubclass(cls, Schedule)
        assert cls.name == name


@pytest.mark.parametrize("name", NAMES)
def test_get_schedule_returns_instance(name):
    schedule = get_schedule(name)
    assert isinstance(schedule, SCHEDULES[name])


@pytest.mark.parametrize("name", NAMES)
def test_endpoints(name):
    schedule = get_schedule(name)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = schedule(t)
    assert out.alpha_t[0].item() == pytest.approx(0.0, abs=1e-15)
    assert out.beta_t[0].item() == pytest.approx(1.0, abs=1e-15)
    assert out.alpha_t[1].item() == pytest.approx(1.0, abs=1e-15)
    assert out.beta_t[1].item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_values_match_closed_forms(name):
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    out = get_schedule(name)(t)
    alpha, beta = CLOSED_FORMS[name]
    torch.testing.assert_close(out.alpha_t, alpha(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(out.beta_t, beta(t), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_and_dtype_follow_t(name):
    t = torch.rand(3, 5, dtype=torch.float64)
    out = get_schedule(name)(t)
    for value in (out.alpha_t, out.beta_t, out.d_alpha_t, out.d_beta_t):
        assert value.shape == t.shape
        assert value.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_alpha_increasing_beta_decreasing(name):
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    out = get_schedule(name)(t)
    assert (out.alpha_t.diff() > 0).all()
    assert (out.beta_t.diff() < 0).all()
    inner = (t > 0) & (t < 1)
    assert (out.d_alpha_t[inner] > 0).all()
    assert (out.d_beta_t[inner] < 0).all()
    assert ((out.alpha_t >= 0) & (out.alpha_t <= 1)).all()
    assert ((out.beta_t >= 0) & (out.beta_t <= 1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_central_differences(name):
    schedule = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    out = schedule(t)
    plus, minus = schedule(t + h), schedule(t - h)
    fd_alpha = (plus.alpha_t - minus.alpha_t) / (2 * h)
    fd_beta = (plus.beta_t - minus.beta_t) / (2 * h)
    # Truncation error h^2 f'''/6 is < 1e-8 even for sqrt(1 - t) at t = 0.99; rounding ~1e-10.
    torch.testing.assert_close(out.d_alpha_t, fd_alpha, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.d_beta_t, fd_beta, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autograd(name):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    out = get_schedule(name)(t)
    (g_alpha,) = torch.autograd.grad(out.alpha_t.sum(), t, retain_graph=True)
    (g_beta,) = torch.autograd.grad(out.beta_t.sum(), t)
    torch.testing.assert_close(out.d_alpha_t.detach(), g_alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.d_beta_t.detach(), g_beta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["", "Linear", "vp", "cos"])
def test_unknown_schedule_raises_usage_error_listing_choices(bad):
    with pytest.raises(UsageError) as info:
        get_schedule(bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in NAMES:
        assert name in message


def test_usage_error_is_a_value_error():
    with pytest.raises(ValueError):
        get_schedule("nope")
