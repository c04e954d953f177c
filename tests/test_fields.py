"""Fields: the exact Gaussian-mixture field against autograd and the continuity equation; the
network field's classifier-free guidance identities (MATH.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowdiff.fields import ModelField, guide
from flowdiff.paths import GaussianConditionalPath
from flowdiff.schedules import SCHEDULES
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

NAMES = sorted(SCHEDULES)
DTYPE = torch.float64


def mixture(name, shape=(2,), t_min=0.0, t_max=1.0):
    """A 3-component mixture with distinct weights, means and stds, on the path ``name``."""
    path = GaussianConditionalPath(name, t_min=t_min, t_max=t_max)
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn((3, *shape), generator=g, dtype=DTYPE)
    return GaussianMixtureField(path, [0.5, 0.3, 0.2], means, [0.4, 1.0, 0.7])


def points(shape, batch=32, seed=1, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn((batch, *shape), generator=g, dtype=DTYPE)
    t = torch.linspace(lo, hi, batch, dtype=DTYPE)
    return x, t


def log_prob_by_hand(field, x, t):
    """``log sum_k pi_k N(x; alpha_t mu_k, v_k I)``, written from MATH.md without the library."""
    c = field.path.schedule(t)
    d = x[0].numel()
    out = []
    for k in range(len(field.weights)):
        v = c.alpha_t**2 * field.stds[k] ** 2 + c.beta_t**2
        diff = (x - c.alpha_t.view(-1, *([1] * (x.ndim - 1))) * field.means[k]).flatten(1)
        log_n = -0.5 * diff.square().sum(1) / v - 0.5 * d * torch.log(2 * math.pi * v)
        out.append(math.log(field.weights[k]) + log_n)
    return torch.logsumexp(torch.stack(out, 1), 1)


SHAPES = [(2,), (1, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_log_prob_matches_closed_form(name, shape):
    field = mixture(name, shape)
    x, t = points(shape, hi=0.99)
    torch.testing.assert_close(field.log_prob(x, t), log_prob_by_hand(field, x, t))


def test_log_prob_at_t0_is_standard_normal():
    field = mixture("linear")
    x, _ = points((2,))
    expected = -0.5 * x.square().sum(1) - math.log(2 * math.pi)
    torch.testing.assert_close(field.log_prob(x, 0.0), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_score_is_gradient_of_log_prob(name, shape):
    field = mixture(name, shape)
    x, t = points(shape, hi=0.99)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(field.log_prob(x, t).sum(), x)
    torch.testing.assert_close(field.score(x.detach(), t), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_velocity_is_a_x_plus_b_score(name, shape):
    """MATH.md: the marginal velocity is ``a_t x + b_t grad log p_t(x)`` (path conversion)."""
    field = mixture(name, shape, t_min=1e-3, t_max=0.999)
    x, t = points(shape, lo=0.02, hi=0.98)
    u, s = field.velocity_and_score(x, t)
    torch.testing.assert_close(field.path.score_to_velocity(s, x, t), u, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(field.path.velocity_to_score(u, x, t), s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(field.velocity(x, t), u, rtol=0, atol=0)
    torch.testing.assert_close(field.score(x, t), s, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_velocity_satisfies_continuity_equation(name):
    """``d/dt log p_t(x) + div u_t(x) + u_t(x) . grad log p_t(x) = 0`` in 2D, by autograd."""
    field = mixture(name)
    x, t = points((2,), lo=0.02, hi=0.98)
    x.requires_grad_(True)
    t.requires_grad_(True)
    (dlogp_dt,) = torch.autograd.grad(field.log_prob(x, t).sum(), t)
    u, s = field.velocity_and_score(x, t)
    div = sum(torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
    residual = dlogp_dt + div + (u * s).sum(1)
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_single_gaussian_velocity_is_derivative_of_exact_flow(name):
    """One Gaussian: the flow is ``phi_t(x0) = alpha_t mu + sqrt(alpha_t^2 s^2 + beta_t^2) x0``."""
    path = GaussianConditionalPath(name, t_min=0.0, t_max=1.0)
    mu, s = torch.tensor([[1.5, -0.5]], dtype=DTYPE), 0.6
    field = GaussianMixtureField(path, [1.0], mu, [s])
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(20, 2, generator=g, dtype=DTYPE)
    t = torch.linspace(0.01, 0.99, 20, dtype=DTYPE)

    def phi(tt):
        c = path.schedule(tt)
        return c.alpha_t[:, None] * mu + torch.sqrt(c.alpha_t**2 * s**2 + c.beta_t**2)[:, None] * x0

    h = 1e-6
    fd = (phi(t + h) - phi(t - h)) / (2 * h)
    torch.testing.assert_close(field.velocity(phi(t), t), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_single_gaussian_velocity_at_endpoints(name):
    """At t = 0 and t = 1 the field is the one-sided derivative of the exact flow (finite there)."""
    path = GaussianConditionalPath(name, t_min=0.0, t_max=1.0)
    mu, s = torch.tensor([[1.5, -0.5]], dtype=DTYPE), 0.6
    field = GaussianMixtureField(path, [1.0], mu, [s])
    x0 = torch.randn(20, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)

    def phi(t):
        c = path.schedule(torch.full((20,), t, dtype=DTYPE))
        return c.alpha_t[:, None] * mu + torch.sqrt(c.alpha_t**2 * s**2 + c.beta_t**2)[:, None] * x0

    h = 1e-5  # second-order one-sided differences, error O(h^2)
    for t, sign in ((0.0, 1.0), (1.0, -1.0)):
        fd = sign * (-3 * phi(t) + 4 * phi(t + sign * h) - phi(t + 2 * sign * h)) / (2 * h)
        u = field.velocity(phi(t), torch.full((20,), t, dtype=DTYPE))
        assert torch.isfinite(u).all(), f"{name}: velocity not finite at t = {t}"
        torch.testing.assert_close(u, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_field_finite_on_closed_interval(name):
    """MATH.md: the mixture field is finite on all of [0, 1] when every s_k > 0."""
    field = mixture(name)
    x, _ = points((2,))
    for t in (0.0, 1.0):
        u, s = field.velocity_and_score(x, torch.full((x.shape[0],), t, dtype=DTYPE))
        assert torch.isfinite(s).all(), f"{name}: score not finite at t = {t}"
        assert torch.isfinite(u).all(), f"{name}: velocity not finite at t = {t}"
    # t = 0: p_0 = N(0, I), so the score is -x; on the linear path u_0(x) = E[z] - x.
    u0, s0 = field.velocity_and_score(x, torch.zeros(x.shape[0], dtype=DTYPE))
    torch.testing.assert_close(s0, -x)
    if name == "linear":
        mean_z = (field.weights[:, None] * field.means).sum(0)
        torch.testing.assert_close(u0, mean_z - x)
    # t = 1: p_1 = p_data.
    x1 = torch.randn(x.shape, dtype=DTYPE)
    ones = torch.ones(x.shape[0], dtype=DTYPE)
    comps = torch.stack(
        [
            math.log(w) + torch.distributions.Normal(m, sd).log_prob(x1).sum(1)
            for w, m, sd in zip(
                field.weights.tolist(), field.means, field.stds.tolist(), strict=True
            )
        ],
        1,
    )
    torch.testing.assert_close(field.log_prob(x1, ones), torch.logsumexp(comps, 1))


def test_scalar_time_is_broadcast():
    field = mixture("cosine")
    x, _ = points((2,), batch=5)
    u_scalar, s_scalar = field.velocity_and_score(x, 0.3)
    u_vec, s_vec = field.velocity_and_score(x, torch.full((5,), 0.3, dtype=DTYPE))
    torch.testing.assert_close(u_scalar, u_vec, rtol=0, atol=0)
    torch.testing.assert_close(s_scalar, s_vec, rtol=0, atol=0)


def test_component_field_is_single_gaussian():
    field = mixture("linear")
    comp = field.component(1)
    assert comp.means.shape == (1, 2)
    torch.testing.assert_close(comp.means[0], field.means[1])
    x, t = points((2,), hi=0.99)
    c = field.path.schedule(t)
    v = (c.alpha_t**2 * 1.0**2 + c.beta_t**2)[:, None]
    expected_score = -(x - c.alpha_t[:, None] * field.means[1]) / v
    torch.testing.assert_close(comp.score(x, t), expected_score)


def test_mixture_sample_statistics():
    field = mixture("linear")
    g = torch.Generator().manual_seed(4)
    n = 20000
    x, k = field.sample(n, generator=g)
    assert x.shape == (n, 2) and k.shape == (n,)
    for j, (w, s) in enumerate(zip(field.weights.tolist(), field.stds.tolist(), strict=True)):
        sel = x[k == j]
        frac = sel.shape[0] / n
        assert abs(frac - w) < 5 * math.sqrt(w * (1 - w) / n)
        assert (sel.mean(0) - field.means[j]).abs().max() < 5 * s / math.sqrt(sel.shape[0])
        assert (sel.std(0) - s).abs().max() < 5 * s / math.sqrt(2 * sel.shape[0])


# -- ModelField and classifier-free guidance ------------------------------------------------------


class StubNet(nn.Module):
    """``A x + c t + offset[y]``: affine in x and t, with a label-dependent offset; counts calls."""

    def __init__(self, dim=2, num_classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(42)
        self.a = torch.randn(dim, dim, generator=g, dtype=DTYPE)
        self.c = torch.randn(dim, generator=g, dtype=DTYPE)
        self.offset = torch.randn(num_classes + 1, dim, generator=g, dtype=DTYPE)
        self.null_label = num_classes
        self.calls: list[tuple[int, tuple | None]] = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else tuple(y.tolist())))
        assert t.shape == (x.shape[0],)
        out = x @ self.a.T + t[:, None] * self.c
        if y is not None:
            assert y.shape == (x.shape[0],)
            out = out + self.offset[y]
        return out


def stub_inputs(batch=6):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 2, generator=g, dtype=DTYPE)
    t = torch.linspace(0.1, 0.9, batch, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 0, 1, 2][:batch])
    return x, t, y


def direct(net, x, t, y):
    """The stub's output without counting the call."""
    out = net(x, t, y)
    net.calls.pop()
    return out


@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_guidance_zero_is_unconditional(prediction):
    net = StubNet()
    path = GaussianConditionalPath("linear")
    x, t, y = stub_inputs()
    null = torch.full_like(y, net.null_label)
    field = ModelField(net, path, prediction, y=y, guidance=0.0, null_label=net.null_label)
    torch.testing.assert_close(field.output(x, t), direct(net, x, t, null), rtol=1e-12, atol=1e-12)
    unconditional = ModelField(net, path, prediction, y=null)
    torch.testing.assert_close(
        field.velocity(x, t), unconditional.velocity(x, t), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(field.score(x, t), unconditional.score(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_guidance_one_is_conditional(prediction):
    net = StubNet()
    path = GaussianConditionalPath("cosine")
    x, t, y = stub_inputs()
    field = ModelField(net, path, prediction, y=y, guidance=1.0, null_label=net.null_label)
    torch.testing.assert_close(field.output(x, t), direct(net, x, t, y), rtol=1e-12, atol=1e-12)
    # Without guidance the conditional branch alone is evaluated, once, with batch B.
    net.calls.clear()
    plain = ModelField(net, path, prediction, y=y)
    torch.testing.assert_close(plain.output(x, t), direct(net, x, t, y), rtol=1e-12, atol=1e-12)
    assert net.calls == [(x.shape[0], tuple(y.tolist()))]


@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, 3.5, -1.0])
def test_guidance_is_affine_in_w(prediction, w):
    net = StubNet()
    path = GaussianConditionalPath("sqrt")
    x, t, y = stub_inputs()
    null = torch.full_like(y, net.null_label)
    out_null, out_cond = direct(net, x, t, null), direct(net, x, t, y)
    field = ModelField(net, path, prediction, y=y, guidance=w, null_label=net.null_label)
    expected = (1 - w) * out_null + w * out_cond
    torch.testing.assert_close(field.output(x, t), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(guide(out_null, out_cond, w), expected, rtol=1e-12, atol=1e-12)
    # The conversions are affine with a shared x term, so velocity and score guide alike (MATH.md).
    u_null, s_null = ModelField(net, path, prediction, y=null).velocity_and_score(x, t)
    u_cond, s_cond = ModelField(net, path, prediction, y=y).velocity_and_score(x, t)
    u, s = field.velocity_and_score(x, t)
    torch.testing.assert_close(u, (1 - w) * u_null + w * u_cond, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, (1 - w) * s_null + w * s_cond, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(field.velocity(x, t), u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w", [0.3, 4.0])
def test_guided_path_is_one_forward_of_batch_2b(w):
    net = StubNet()
    path = GaussianConditionalPath("linear")
    x, t, y = stub_inputs()
    field = ModelField(net, path, "velocity", y=y, guidance=w, null_label=net.null_label)
    field.velocity(x, t)
    assert len(net.calls) == 1
    batch, labels = net.calls[0]
    assert batch == 2 * x.shape[0]
    assert sorted(labels) == sorted([net.null_label] * x.shape[0] + y.tolist())
    net.calls.clear()
    field.velocity_and_score(x, t)
    assert [c[0] for c in net.calls] == [2 * x.shape[0]]


def test_guidance_zero_is_one_forward_of_the_null_branch():
    net = StubNet()
    x, t, y = stub_inputs()
    field = ModelField(net, GaussianConditionalPath("linear"), "velocity", y, 0.0, net.null_label)
    field.velocity(x, t)
    assert net.calls == [(x.shape[0], (net.null_label,) * x.shape[0])]


def test_model_field_conversions_follow_path():
    net = StubNet()
    path = GaussianConditionalPath("cosine")
    x, t, _ = stub_inputs()
    out = direct(net, x, t, None)
    for prediction in ("velocity", "score", "noise"):
        field = ModelField(net, path, prediction)
        u, s = field.velocity_and_score(x, t)
        eu, es = path.to_velocity_and_score(out, prediction, x, t)
        torch.testing.assert_close(u, eu, rtol=0, atol=0)
        torch.testing.assert_close(s, es, rtol=0, atol=0)
        torch.testing.assert_close(field.velocity(x, t), eu, rtol=1e-12, atol=1e-12)
    # A scalar time is broadcast to (B,).
    field = ModelField(net, path, "velocity")
    torch.testing.assert_close(
        field.velocity(x, 0.4), direct(net, x, torch.full((6,), 0.4, dtype=DTYPE), None)
    )


def test_guidance_without_labels_raises():
    net = StubNet()
    path = GaussianConditionalPath("linear")
    for w in (0.0, 1.0, 3.0):
        with pytest.raises(UsageError):
            ModelField(net, path, "velocity", guidance=w, null_label=net.null_label)


def test_guidance_without_null_label_raises():
    net = StubNet()
    path = GaussianConditionalPath("linear")
    _, _, y = stub_inputs()
    with pytest.raises(UsageError):
        ModelField(net, path, "velocity", y=y, guidance=2.0)
    # w = 1 needs no null label: it is the conditional model.
    ModelField(net, path, "velocity", y=y, guidance=1.0)


@pytest.mark.parametrize(
    "interval", [(0.8, 0.2), (-0.1, 0.5), (0.5, 1.5), (0.2,), (0.1, 0.2, 0.3), ("a", 1),
                 (float("nan"), 1.0), 3],
)  # fmt: skip
def test_bad_guidance_intervals_raise(interval):
    net = StubNet()
    _, _, y = stub_inputs()
    with pytest.raises(UsageError, match="guidance interval"):
        ModelField(net, GaussianConditionalPath("linear"), "velocity", y, 2.0, net.null_label,
                   guidance_interval=interval)  # fmt: skip


def test_guidance_interval_end_points_may_meet():
    net = StubNet()
    x, _, y = stub_inputs()
    field = ModelField(net, GaussianConditionalPath("linear"), "velocity", y, 2.0, net.null_label,
                       guidance_interval=(0.5, 0.5))  # fmt: skip
    assert field.guidance_interval == (0.5, 0.5)
    t = torch.full((6,), 0.4, dtype=DTYPE)
    torch.testing.assert_close(field.output(x, t), direct(net, x, t, y), rtol=0, atol=0)
