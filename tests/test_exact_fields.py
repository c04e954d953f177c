"""The module, the model field and the samplers driven by networks that output exact answers
(MATH.md, "Closed forms for tests"): the CFM minimum through FlowModule.loss, noise and score
predictions on a path with t_min > 0, guidance with per-component fields, batch independence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flowdiff.fields import ModelField
from flowdiff.module import FlowModule
from flowdiff.nets.mlp import MLP
from flowdiff.nets.unet import UNet
from flowdiff.objectives import ConditionalFlowMatching
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import EulerSampler, HeunSampler
from flowdiff.testing import GaussianMixtureField

DTYPE = torch.float64
MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.5]], dtype=DTYPE)
STDS = [0.5, 0.8]
WEIGHTS = [0.4, 0.6]


class ExactNet(nn.Module):
    """Outputs what an ideal network would: the velocity, noise or score of a mixture; with labels,
    of component ``y`` (the null label ``num_classes``: the whole mixture)."""

    def __init__(self, field: GaussianMixtureField, prediction: str, num_classes: int = 0):
        super().__init__()
        self.field, self.prediction, self.num_classes = field, prediction, num_classes

    def one(self, field, x: Tensor, t: Tensor) -> Tensor:
        u, s = field.velocity_and_score(x, t)
        if self.prediction == "velocity":
            return u
        if self.prediction == "score":
            return s
        return -field.path.schedule(t).beta_t[:, None] * s  # noise = -beta_t score

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None or not self.num_classes:
            return self.one(self.field, x, t)
        out = torch.empty_like(x)
        for k in y.unique().tolist():
            rows = y == k
            field = self.field if k == self.num_classes else self.field.component(k)
            out[rows] = self.one(field, x[rows], t[rows])
        return out


def test_module_loss_of_the_exact_field_is_the_cfm_minimum():
    """Target N(mu, s^2 I), linear path, t ~ U[0, 1]: FlowModule.loss of the exact field is
    s pi / 2 (per-element mean), whatever mu is."""
    mu, s = torch.tensor([[2.0, -1.0]], dtype=DTYPE), 0.5
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0)
    net = ExactNet(GaussianMixtureField(path, [1.0], mu, [s]), "velocity")
    module = FlowModule(net, path, ConditionalFlowMatching(), data_shape=[2])
    g = torch.Generator().manual_seed(5)
    losses = torch.stack([
        module.loss(mu + s * torch.randn(5000, 2, generator=g, dtype=DTYPE), None, g)
        for _ in range(40)
    ])  # fmt: skip
    stderr = losses.std().item() / math.sqrt(len(losses))
    assert abs(losses.mean().item() - s * math.pi / 2) < 4 * stderr


@pytest.mark.parametrize("prediction", ["noise", "score"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_noise_and_score_predictions_sample_the_target(prediction, schedule):
    """A noise or score network on a path with t_min > 0, through ModelField's conversions and a
    sampler, reproduces the target: the mixture's weights, means and spreads."""
    path = GaussianConditionalPath(schedule, t_min=0.01, t_max=0.999)
    exact = GaussianMixtureField(path, WEIGHTS, MEANS, STDS)
    field = ModelField(ExactNet(exact, prediction), path, prediction)
    g = torch.Generator().manual_seed(6)
    n = 4000
    # start from the exact p_{t_min}: the mixture pushed to t_min
    c = path.schedule(torch.tensor(path.t_min, dtype=DTYPE))
    z, k = exact.sample(n, g)
    x_0 = c.alpha_t * z + c.beta_t * torch.randn(n, 2, generator=g, dtype=DTYPE)
    x = HeunSampler(100).sample(field, x_0, path.t_min, path.t_max).x
    for j, (w, s) in enumerate(zip(WEIGHTS, STDS, strict=True)):
        sel = x[(x[:, 0] > 0) == bool(j)]
        assert abs(len(sel) / n - w) < 4 * math.sqrt(w * (1 - w) / n) + 0.01
        assert (sel.mean(0) - MEANS[j]).abs().max() < 4 * s / math.sqrt(len(sel)) + 0.02
        assert (sel.std(0) / s - 1).abs().max() < 4 / math.sqrt(2 * len(sel)) + 0.03


def test_guidance_one_reproduces_the_component_and_zero_the_mixture():
    """CFG with per-component fields: w = 1 samples component k, w = 0 the mixture, and any w
    combines the two branches as (1 - w) u(x|null) + w u(x|y) (evaluated in one 2B batch)."""
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0)
    exact = GaussianMixtureField(path, WEIGHTS, MEANS, STDS)
    net = ExactNet(exact, "velocity", num_classes=2)
    g = torch.Generator().manual_seed(7)
    n = 4000
    x_0 = torch.randn(n, 2, generator=g, dtype=DTYPE)
    y = torch.full((n,), 1)
    one = EulerSampler(200).sample(ModelField(net, path, "velocity", y, 1.0, 2), x_0).x
    assert (one.mean(0) - MEANS[1]).abs().max() < 4 * STDS[1] / math.sqrt(n) + 0.02
    assert (one.std(0) / STDS[1] - 1).abs().max() < 4 / math.sqrt(2 * n) + 0.02
    zero = EulerSampler(200).sample(ModelField(net, path, "velocity", y, 0.0, 2), x_0).x
    assert abs((zero[:, 0] > 0).double().mean().item() - WEIGHTS[1]) < 4 * math.sqrt(0.24 / n)
    x, t = torch.randn(8, 2, generator=g, dtype=DTYPE), torch.full((8,), 0.4, dtype=DTYPE)
    guided = ModelField(net, path, "velocity", y[:8], 3.0, 2).velocity(x, t)
    u_k, u_null = exact.component(1).velocity(x, t), exact.velocity(x, t)
    torch.testing.assert_close(guided, u_null + 3.0 * (u_k - u_null), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: MLP(hidden=32, depth=2, num_classes=3), (2,)),
        (lambda: UNet(channels=[8, 16], num_res_blocks=1, num_classes=3, zero_init=False),
         (1, 8, 8)),
        (lambda: UNet(channels=[8, 16], num_res_blocks=1, num_classes=3, zero_init=False,
                      norm="batch"), (1, 8, 8)),
    ],
    ids=["mlp", "unet-group-norm", "unet-batch-norm"],
)  # fmt: skip
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_networks_treat_samples_independently(make, shape, train):
    """The likelihood's divergence and the batched guidance rely on it: a sample's output does
    not change when the other samples of its batch do (batch norm: only in eval mode, where
    sampling and the likelihood run)."""
    torch.manual_seed(0)
    net = make().train(train)
    if train and any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        pytest.skip("batch statistics mix the samples of a training batch by design")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, *shape, generator=g)
    t, y = torch.rand(6, generator=g), torch.tensor([0, 1, 2, 3, 1, 0])
    other = x.clone()
    other[1:] = torch.randn(5, *shape, generator=g) * 10
    t2, y2 = t.clone(), y.flip(0)
    t2[1:], y2[0] = torch.rand(5, generator=g), y[0]
    with torch.no_grad():
        a, b = net(x, t, y)[0], net(other, t2, y2)[0]
    assert a.abs().max() > 1e-3  # a network that outputs zeros would pass for nothing
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class CountedNet(ExactNet):
    """ExactNet that records the batch size of every forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        return super().forward(x, t, y)


def test_guidance_interval_guides_inside_and_is_the_conditional_field_outside():
    """Kynkäänniemi et al. 2024: w applies for a <= t <= b only. Inside, the field is
    u(x|null) + w (u(x|k) - u(x|null)) from one forward of batch 2B; outside, it is exactly the
    component's field u(x|k), from one forward of batch B."""
    path = GaussianConditionalPath("cosine", t_min=0.0, t_max=1.0)
    exact = GaussianMixtureField(path, WEIGHTS, MEANS, STDS)
    net = CountedNet(exact, "velocity", num_classes=2)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 2, generator=g, dtype=DTYPE), torch.full((8,), 1)
    field = ModelField(net, path, "velocity", y, 3.0, 2, guidance_interval=(0.25, 0.75))
    u_k, u_null = exact.component(1), exact
    for t in (0.25, 0.4, 0.75):  # the interval is closed
        net.batches.clear()
        time = torch.full((8,), t, dtype=DTYPE)
        guided = u_null.velocity(x, time) + 3.0 * (u_k.velocity(x, time) - u_null.velocity(x, time))
        torch.testing.assert_close(field.velocity(x, time), guided, rtol=1e-12, atol=1e-12)
        assert net.batches == [16]
    for t in (0.0, 0.2, 0.76, 1.0):
        net.batches.clear()
        time = torch.full((8,), t, dtype=DTYPE)
        assert torch.equal(field.velocity(x, time), u_k.velocity(x, time))
        assert net.batches == [8]
    # Times that differ within a batch: each row on its own side of the interval.
    time = torch.tensor([0.1, 0.5] * 4, dtype=DTYPE)
    inside = ModelField(net, path, "velocity", y, 3.0, 2).velocity(x, time)
    outside = u_k.velocity(x, time)
    expected = torch.where((time > 0.3)[:, None], inside, outside)
    torch.testing.assert_close(field.velocity(x, time), expected, rtol=1e-12, atol=1e-12)


def test_guidance_interval_costs_no_nfe_and_halves_the_batch_outside():
    """Euler, 10 steps on [0, 1], interval [0.25, 0.75]: steps at t = 0.3..0.7 are guided (batch
    2B), the five others conditional (batch B); the NFE is 10 either way. The full interval [0, 1]
    is plain guidance, and w = 0 outside the interval is still the conditional field."""
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0)
    exact = GaussianMixtureField(path, WEIGHTS, MEANS, STDS)
    net = CountedNet(exact, "velocity", num_classes=2)
    g = torch.Generator().manual_seed(9)
    x_0, y = torch.randn(16, 2, generator=g, dtype=DTYPE), torch.full((16,), 0)
    sampler = EulerSampler(10)
    limited = sampler.sample(ModelField(net, path, "velocity", y, 2.0, 2, (0.25, 0.75)), x_0)
    assert limited.nfe == 10 and net.batches == [16] * 3 + [32] * 5 + [16] * 2
    full = sampler.sample(ModelField(net, path, "velocity", y, 2.0, 2, (0.0, 1.0)), x_0)
    plain = sampler.sample(ModelField(net, path, "velocity", y, 2.0, 2), x_0)
    torch.testing.assert_close(full.x, plain.x, rtol=0, atol=0)
    assert (limited.x - plain.x).abs().max() > 1e-3  # the interval changes the samples
    net.batches.clear()
    unguided = ModelField(net, path, "velocity", y, 0.0, 2, (0.5, 1.0))
    t = torch.full((16,), 0.2, dtype=DTYPE)
    assert torch.equal(unguided.velocity(x_0, t), exact.component(0).velocity(x_0, t))
    assert net.batches == [16]
