"""Point-cloud distances against exact answers."""

import itertools
import math

import pytest
import torch

from flowdiff.metrics import mmd, wasserstein2
from flowdiff.utils import UsageError


@pytest.mark.parametrize("shift", [[0.0, 0.0], [1.5, -2.0], [0.1, 0.0]])
def test_w2_of_shifted_cloud_is_the_shift(shift):
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.tensor(shift, dtype=torch.float64)
    # for a cloud and its translate, the optimal plan is the identity: W2 = |v|
    assert wasserstein2(x, x + v) == pytest.approx(float(v.norm()), abs=1e-5)


def test_w2_of_two_points():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert wasserstein2(x, y) == pytest.approx(1.0)
    assert wasserstein2(x, x.flip(0)) == pytest.approx(0.0)


def line(*values):
    """1-D points (N, 1)."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        # W2 and W1 differ: W2 = sqrt((0^2 + 2^2) / 2) = sqrt(2), W1 = (0 + 2) / 2 = 1.
        (line(0, 0), line(0, 2), math.sqrt(2)),
        # The optimal plan is not the identity: sorted pairs (0, .5), (1, 2), (5, 6), so
        # W2^2 = (.25 + 1 + 1) / 3 = 3/4 (identity: 36 + .25 + 9); W1 = 5/6.
        (line(0, 1, 5), line(6, 0.5, 2), math.sqrt(3) / 2),
        # Unequal sizes, mass 1/2 to each: W2 = sqrt(9 / 2), W1 = 3/2.
        (line(0), line(0, 3), 3 / math.sqrt(2)),
    ],
    ids=["w2-not-w1", "non-identity-plan", "unequal-sizes"],
)
def test_w2_exact_values_that_w1_would_miss(x, y, expected):
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-12)
    assert wasserstein2(y, x) == pytest.approx(expected, rel=1e-12)


def test_w2_in_1d_is_the_sorted_matching():
    """In 1-D the monotone coupling is optimal: W2^2 = mean (sort(x) - sort(y))^2."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 1, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(200, 1, generator=g, dtype=torch.float64).exp()
    expected = (x.flatten().sort().values - y.flatten().sort().values).square().mean().sqrt()
    assert wasserstein2(x, y) == pytest.approx(expected.item(), rel=1e-9)


def test_w2_refuses_to_return_a_value_from_a_capped_solver():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    with pytest.raises(RuntimeError, match=r"iteration cap \(max_iterations=5\)"):
        wasserstein2(x, y, max_iterations=5)
    assert wasserstein2(x, y) > 0  # the default cap is enough


def rbf(a, b, bandwidths):
    d2 = (a[:, None, :] - b[None, :, :]).square().sum(-1)
    return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)


def v_statistic(x, y, bandwidths):
    """The biased MMD^2 estimator (diagonals included): what the test below must tell apart."""
    xx, yy, xy = rbf(x, x, bandwidths), rbf(y, y, bandwidths), rbf(x, y, bandwidths)
    return (xx.mean() + yy.mean() - 2 * xy.mean()).item()


def test_mmd_is_unbiased_exactly():
    """P, Q with finite supports: average the estimator over every possible draw of n = 2 points
    from P and m = 3 from Q, weighted by its probability. That is the estimator's expectation,
    which must be the population MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y). The biased
    V-statistic misses it by (E k(X, X) - E k(X, X')) / n + (the same for Y) / m."""
    bandwidths = (0.5, 2.0)
    sp = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    sq = torch.tensor([[0.5, 0.5], [2.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([0.6, 0.4], dtype=torch.float64)
    population = (
        p @ rbf(sp, sp, bandwidths) @ p
        + q @ rbf(sq, sq, bandwidths) @ q
        - 2 * p @ rbf(sp, sq, bandwidths) @ q
    ).item()
    unbiased = biased = 0.0
    for i in itertools.product(range(3), repeat=2):
        for j in itertools.product(range(2), repeat=3):
            weight = (p[list(i)].prod() * q[list(j)].prod()).item()
            x, y = sp[list(i)], sq[list(j)]
            unbiased += weight * mmd(x, y, bandwidths)
            biased += weight * v_statistic(x, y, bandwidths)
    assert unbiased == pytest.approx(population, rel=1e-12, abs=1e-14)
    assert abs(biased - population) > 0.1


@pytest.mark.parametrize("n, m", [(1, 5), (5, 1), (0, 5)])
def test_mmd_refuses_a_set_of_fewer_than_two_points(n, m):
    """The unbiased within-set term averages over the n (n - 1) pairs of distinct points: with
    one point it would be 0 / 0 (a NaN passed on as a metric)."""
    x, y = torch.zeros(n, 2), torch.ones(m, 2)
    with pytest.raises(UsageError, match=rf"at least 2 points.*got {n} and {m}$"):
        mmd(x, y)


def test_mmd_zero_for_same_set_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    assert abs(mmd(x, y)) < 0.02
    shifted = [mmd(x, y + d) for d in (0.5, 1.0, 2.0)]
    assert shifted[0] > 0.02 and shifted == sorted(shifted)
