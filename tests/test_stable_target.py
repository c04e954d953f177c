"""The stable target field (StableTargetFlowMatching): the marginal field of a Gaussian mixture
from a large reference set, CFM's target from a reference of one, labels, the bank, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowdiff.module import FlowModule
from flowdiff.nets.mlp import MLP
from flowdiff.objectives import ConditionalFlowMatching, StableTargetFlowMatching
from flowdiff.paths import GaussianConditionalPath
from flowdiff.schedules import SCHEDULES
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

DTYPE = torch.float64


def mixture(path):
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=DTYPE)
    return GaussianMixtureField(path, [0.3, 0.7], means, [0.5, 0.8])


def velocity_target(objective, sample, path, y=None, null=None):
    return path.target(objective.stable_sample(sample, path, y, null, update=False), "velocity")


def with_bank(points, labels=None):
    """An objective whose bank holds ``points`` (as if earlier batches had brought them)."""
    objective = StableTargetFlowMatching(len(points))
    objective._bank = (points, labels)
    return objective


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_large_reference_set_gives_the_marginal_field(name):
    """With n reference points the target is the self-normalised estimate of E[u_t(x|z) | x]:
    it converges to the exact field, where CFM's one-draw target stays O(1) away from it."""
    path = GaussianConditionalPath(name, t_min=0.05, t_max=0.8)
    field = mixture(path)
    g = torch.Generator().manual_seed(0)
    z, _ = field.sample(1_000, generator=g)
    t = path.sample_time(len(z), dtype=DTYPE, generator=g)
    sample = path.sample(z, t, torch.randn(z.shape, generator=g, dtype=DTYPE))
    exact = field.velocity(sample.x_t, t)
    stable = velocity_target(with_bank(field.sample(30_000, generator=g)[0]), sample, path)
    cfm = path.target(sample, "velocity")
    stable_error = (stable - exact).square().sum(1).mean().sqrt()
    cfm_error = (cfm - exact).square().sum(1).mean().sqrt()
    assert cfm_error > 0.5
    assert stable_error < 0.05 * cfm_error, (stable_error, cfm_error)


def test_a_reference_of_one_is_the_cfm_target():
    path = GaussianConditionalPath("linear")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 3, generator=g, dtype=DTYPE)
    for t in (0.0, 0.3, 0.999, 1.0):
        sample = path.sample(z, torch.tensor([t], dtype=DTYPE), torch.randn(1, 3, dtype=DTYPE))
        target = velocity_target(StableTargetFlowMatching(0), sample, path)
        torch.testing.assert_close(target, path.target(sample, "velocity"), rtol=0, atol=1e-12)


def test_at_the_data_end_the_target_is_cfm_on_every_row():
    """At t = 1 (beta = 0) the weights fall on each row's own point: no 0/0, CFM's target."""
    path = GaussianConditionalPath("linear")
    z = torch.randn(64, 2, dtype=DTYPE)
    sample = path.sample(z, torch.ones(64, dtype=DTYPE), torch.randn(64, 2, dtype=DTYPE))
    target = velocity_target(StableTargetFlowMatching(0), sample, path)
    torch.testing.assert_close(target, path.target(sample, "velocity"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_target_is_the_float32_one(dtype):
    """Mixed precision (the CLI's default on a GPU) must not reach the posterior: near t = 1 the
    target multiplies ``z_hat - z`` by ``alpha_t / beta_t`` (999 at t = 0.999), so ``z_hat``
    rounded to 8 or 11 bits would become an O(1) error of the target (up to 238 seen in
    bfloat16 before the fix). Under autocast the target equals the float32 one to the
    output's accuracy in ``dtype``, and CFM's where the posterior is one point: 256 points on a
    jittered grid (spacing >= 0.15), so at t = 0.999 every other point has a weight below
    exp(-(0.999 * 0.15)^2 / (2 * 0.001^2)) = exp(-11000), 0 in float32."""
    path = GaussianConditionalPath("linear")
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
    z = (grid.reshape(-1, 2) - 7.5) * 0.25 + (torch.rand(256, 2, generator=g) - 0.5) * 0.1
    t = torch.cat([torch.rand(128, generator=g), torch.full((128,), 0.999)])
    sample = path.sample(z, t, torch.randn(256, 2, generator=g))
    fp32 = velocity_target(StableTargetFlowMatching(0), sample, path)
    with torch.autocast("cpu", dtype=dtype):
        mixed = velocity_target(StableTargetFlowMatching(0), sample, path)
    assert mixed.dtype == torch.float32
    resolution = torch.finfo(dtype).eps
    torch.testing.assert_close(mixed, fp32, rtol=resolution, atol=resolution)
    cfm = path.target(sample, "velocity")
    torch.testing.assert_close(mixed[128:], cfm[128:], rtol=resolution, atol=resolution)


def test_labels_keep_the_reference_set_within_the_class():
    """Two classes far apart: a class's target is the field of its own component; the null
    label (guidance's unconditional branch) weighs every point."""
    path = GaussianConditionalPath("linear")
    field = mixture(path)
    g = torch.Generator().manual_seed(2)
    z, y = field.sample(1_500, generator=g)
    t = torch.full((len(z),), 0.3, dtype=DTYPE)
    sample = path.sample(z, t, torch.randn(z.shape, generator=g, dtype=DTYPE))
    null = 2
    y_in = torch.where(torch.arange(len(z)) % 3 == 0, torch.full_like(y, null), y)
    bank, bank_y = field.sample(30_000, generator=g)
    bank_y[::4] = null  # dropped labels: these points serve the null rows only
    stable = velocity_target(with_bank(bank, bank_y), sample, path, y_in, null)
    for k in (0, 1):
        rows = y_in == k
        exact = field.component(k).velocity(sample.x_t[rows], t[rows])
        error = (stable[rows] - exact).square().sum(1).mean().sqrt()
        assert error < 0.05, (k, error)
    rows = y_in == null  # their data come from both classes, and so does their reference set
    error = (stable[rows] - field.velocity(sample.x_t[rows], t[rows])).square().sum(1).mean()
    assert error.sqrt() < 0.05


def test_the_bank_keeps_the_last_points_of_training_batches_only():
    path = GaussianConditionalPath("linear")
    objective = StableTargetFlowMatching(reference=5)
    net = MLP(dim=2, hidden=8, depth=1, num_classes=0)
    batches = [torch.full((3, 2), float(i)) for i in range(3)]
    for z in batches:
        sample = path.sample(z, torch.full((3,), 0.5))
        objective.loss(net, sample, path)
    assert torch.equal(objective._bank[0][:, 0], torch.tensor([2.0, 2, 2, 1, 1]))
    net.eval()  # validation: the bank does not change
    objective.loss(net, path.sample(torch.full((3, 2), 9.0), torch.full((3,), 0.5)), path)
    assert torch.equal(objective._bank[0][:, 0], torch.tensor([2.0, 2, 2, 1, 1]))
    assert StableTargetFlowMatching(0)._bank is None


def test_the_loss_trains_a_network():
    """The loss is differentiable in the network and never in the target."""
    path = GaussianConditionalPath("linear")
    net = MLP(dim=2, hidden=16, depth=2, num_classes=0)
    sample = path.sample(torch.randn(32, 2), torch.rand(32))
    loss = StableTargetFlowMatching(64).loss(net, sample, path).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_refusals():
    with pytest.raises(UsageError, match="reference >= 0"):
        StableTargetFlowMatching(-1)
    net: nn.Module = MLP(dim=2, hidden=8, depth=1, num_classes=0)
    path = GaussianConditionalPath("linear")
    with pytest.raises(UsageError, match="independent coupling"):
        FlowModule(net, path, StableTargetFlowMatching(), coupling="ot")
    FlowModule(net, path, ConditionalFlowMatching(), coupling="ot")
    FlowModule(net, path, StableTargetFlowMatching())


def test_a_non_finite_data_point_weighs_nothing_while_in_the_bank():
    """A batch with a nan point (which the non-finite guard skips) must not spoil the targets of
    the batches after it through the bank."""
    path = GaussianConditionalPath("linear")
    net = MLP(dim=2, hidden=8, depth=1, num_classes=0)
    g = torch.Generator().manual_seed(3)
    bad = torch.randn(4, 2, generator=g)
    bad[1, 0] = float("nan")
    clean, spoiled = StableTargetFlowMatching(8), StableTargetFlowMatching(8)
    spoiled.loss(net, path.sample(bad, torch.full((4,), 0.5)), path)
    clean.loss(net, path.sample(bad[[0, 2, 3]], torch.full((3,), 0.5)), path)
    z, t = torch.randn(5, 2, generator=g), torch.rand(5, generator=g)
    eps = torch.randn(5, 2, generator=g)
    targets = [
        velocity_target(objective, path.sample(z, t, eps), path) for objective in (clean, spoiled)
    ]
    assert torch.isfinite(targets[1]).all()
    torch.testing.assert_close(targets[1], targets[0])
