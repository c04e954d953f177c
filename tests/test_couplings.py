"""Minibatch couplings against brute force: the exact OT pairing is the cheapest of all B!
permutations, labels are never crossed, Sinkhorn tends to the exact cost within its bound, and the
default changes nothing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowdiff.couplings import (
    ExactOTCoupling,
    IndependentCoupling,
    SinkhornCoupling,
    get_coupling,
    squared_distances,
)
from flowdiff.utils import UsageError

DTYPE = torch.float64


def batch(b: int, shape=(2,), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise x_0 and data x_1 (shifted, scaled: the pairing matters)."""
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn((b, *shape), generator=g, dtype=DTYPE)
    x_1 = 2.0 * torch.randn((b, *shape), generator=g, dtype=DTYPE) + 1.0
    return x_0, x_1


def total_cost(x_0: torch.Tensor, x_1: torch.Tensor) -> float:
    """sum_j ||x_0^j - x_1^j||^2 of row-wise pairs, written without the library."""
    return (x_0 - x_1).reshape(len(x_0), -1).square().sum().item()


def brute_force(x_0: torch.Tensor, x_1: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """The cheapest pairing over all permutations: (cost, index with x_0[index[j]] ~ x_1[j])."""
    best = min(
        itertools.permutations(range(len(x_1))),
        key=lambda p: total_cost(x_0[list(p)], x_1),
    )
    return total_cost(x_0[list(best)], x_1), best


@pytest.mark.parametrize("shape", [(2,), (1, 3, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_exact_ot_is_the_cheapest_permutation(seed, shape):
    x_0, x_1 = batch(6, shape, seed)
    paired = ExactOTCoupling()(x_0, x_1)
    cost, best = brute_force(x_0, x_1)
    assert paired.shape == x_0.shape
    assert total_cost(paired, x_1) == pytest.approx(cost, rel=1e-12)
    assert torch.equal(paired, x_0[list(best)])  # random data: the optimum is unique
    assert total_cost(paired, x_1) <= total_cost(x_0, x_1)  # never worse than as drawn


def test_exact_ot_keeps_every_noise_draw_once():
    x_0, x_1 = batch(200, seed=1)
    paired = ExactOTCoupling()(x_0, x_1)
    assert torch.equal(paired.sort(0).values, x_0.sort(0).values)
    assert total_cost(paired, x_1) < total_cost(x_0, x_1)


@pytest.mark.parametrize("coupling", [ExactOTCoupling(), SinkhornCoupling(0.1)], ids=repr)
@pytest.mark.parametrize("seed", range(3))
def test_labels_are_never_crossed(coupling, seed):
    """Within each label (the null label 2 included) noise goes to data of that label only; for
    the exact coupling each group's pairing is its brute-force optimum."""
    x_0, x_1 = batch(9, seed=seed)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2, 1, 0])
    paired = coupling(x_0, x_1, labels)
    source = [(x_0 == row).all(1).nonzero().item() for row in paired]  # which noise row went where
    assert all(labels[i] == labels[j] for j, i in enumerate(source))
    if isinstance(coupling, ExactOTCoupling):
        assert len(set(source)) == len(source)
        for label in labels.unique():
            members = (labels == label).nonzero().squeeze(1)
            cost, _ = brute_force(x_0[members], x_1[members])
            assert total_cost(paired[members], x_1[members]) == pytest.approx(cost, rel=1e-12)


def test_a_class_alone_keeps_its_noise():
    """A group of one can only be paired with its own noise."""
    x_0, x_1 = batch(4)
    paired = ExactOTCoupling()(x_0, x_1, torch.tensor([0, 1, 1, 1]))
    assert torch.equal(paired[0], x_0[0])


def plan_cost(plan: torch.Tensor, cost: torch.Tensor) -> float:
    return (plan * cost).sum().item()


@pytest.mark.parametrize("seed", range(3))
def test_sinkhorn_tends_to_the_exact_cost(seed):
    """With cost C / mean(C) and reg r, the entropic plan's cost exceeds the exact plan's by at
    most r log B (entropy of a B x B plan <= 2 log B, of a permutation plan = log B); it falls
    as r does, and is never below the exact cost (up to the marginals' tolerance)."""
    x_0, x_1 = batch(6, seed=seed)
    cost = squared_distances(x_0, x_1)
    cost = cost / cost.mean()
    exact = brute_force(x_0, x_1)[0] / 6 / squared_distances(x_0, x_1).mean().item()
    costs = []
    for reg in (1.0, 0.1, 0.05):
        plan = SinkhornCoupling(reg).plan(x_0, x_1)
        for sums in (plan.sum(0), plan.sum(1)):  # the marginals, to Sinkhorn's tolerance
            torch.testing.assert_close(sums, torch.full_like(sums, 1 / 6), atol=1e-7, rtol=0)
        costs.append(plan_cost(plan, cost))
        assert exact - 1e-9 <= costs[-1] <= exact + reg * math.log(6) + 1e-9
    assert costs[0] > costs[1] > costs[2]


def test_sinkhorn_pairs_are_drawn_from_the_plan():
    """Data point j draws noise i with probability pi_ij / sum_i pi_ij: over many draws, the
    frequencies match the plan within 5 standard errors."""
    x_0, x_1 = batch(4, seed=2)
    coupling = SinkhornCoupling(0.5)
    plan = coupling.plan(x_0, x_1)
    g = torch.Generator().manual_seed(0)
    n = 5000
    counts = torch.zeros(4, 4, dtype=DTYPE)
    for _ in range(n):
        index = coupling.draw(plan, g)
        counts[index, torch.arange(4)] += 1
    expected = plan * 4  # column j sums to 1
    stderr = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 5 * stderr + 1e-12).all()


def test_sinkhorn_reports_underflow():
    x_0, x_1 = batch(64, seed=3)
    with pytest.raises(UsageError, match="raise reg"):
        SinkhornCoupling(1e-4)(x_0, x_1)


def test_independent_changes_nothing():
    x_0, x_1 = batch(8)
    assert IndependentCoupling()(x_0, x_1, torch.zeros(8, dtype=torch.long)) is x_0


def test_names_and_bad_arguments():
    assert isinstance(get_coupling("ot"), ExactOTCoupling)
    assert get_coupling("ot-sinkhorn").reg == 0.05
    assert isinstance(get_coupling("flowdiff.couplings.IndependentCoupling"), IndependentCoupling)
    with pytest.raises(UsageError, match="unknown coupling 'sinkhorn'"):
        get_coupling("sinkhorn")
    for reg in (0.0, -0.1, float("nan")):
        with pytest.raises(UsageError, match="reg > 0"):
            SinkhornCoupling(reg)


class Spy(torch.nn.Module):
    """A network that keeps what the module gives it and predicts zeros."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight = torch.nn.Parameter(torch.zeros((), dtype=DTYPE))

    def forward(self, x, t, y=None):
        self.seen = (x, t, y)
        return x * self.weight


@pytest.mark.parametrize("coupling", ["independent", "ot"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_the_module_trains_on_the_coupled_noise(coupling, num_classes):
    """The noise inside x_t = t z + (1 - t) x_0 (linear path on [0, 1]) is the draw of t and noise
    that the generator gave before couplings existed, re-paired by the coupling: untouched by
    the default, within labels when the network takes them."""
    from flowdiff.module import FlowModule
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath

    path = GaussianConditionalPath("linear", t_min=0.0, t_max=0.9)
    module = FlowModule(Spy(num_classes), path, ConditionalFlowMatching(), coupling=coupling,
                        data_shape=[2])  # fmt: skip
    _, z = batch(12, seed=5)
    y = torch.arange(12) % 3
    module.loss(z, y, torch.Generator().manual_seed(9))
    x_t, t, seen_y = module.net.seen
    g = torch.Generator().manual_seed(9)
    t_drawn = 0.9 * torch.rand(12, generator=g, dtype=DTYPE)
    eps = torch.empty_like(z).normal_(generator=g)
    assert torch.equal(t, t_drawn)
    x_0 = (x_t - t[:, None] * z) / (1 - t[:, None])
    labels = y if num_classes else None
    expected = eps if coupling == "independent" else ExactOTCoupling()(eps, z, labels)
    torch.testing.assert_close(x_0, expected, rtol=1e-12, atol=1e-12)
    assert (seen_y is None) == (num_classes == 0)
