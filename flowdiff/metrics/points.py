"""Distances between point clouds: exact W2 (POT) and RBF MMD."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import ot
import torch
from torch import Tensor

from flowdiff.utils import UsageError

_OPTIMAL, _MAX_ITER_REACHED = 1, 3  # POT's network-simplex result codes


def wasserstein2(x: Tensor, y: Tensor, max_iterations: int = 10_000_000) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of ``x`` (N, D) and ``y`` (M, D).

    Solves the optimal-transport linear program exactly (POT's network simplex), in float64.
    Raises ``RuntimeError`` if the solver stops short of the optimum (e.g. at ``max_iterations``).
    """
    a = x.detach().double().flatten(1).cpu().numpy()
    b = y.detach().double().flatten(1).cpu().numpy()
    cost = ot.dist(a, b)  # squared Euclidean
    w_a, w_b = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    with warnings.catch_warnings():  # POT only warns; the result code is checked below
        warnings.simplefilter("ignore", UserWarning)
        w2, log = ot.emd2(w_a, w_b, cost, numItermax=max_iterations, log=True)
    _check_emd(log, max_iterations)
    return float(np.sqrt(max(w2, 0.0)))


def _check_emd(log: dict, max_iterations: int) -> None:
    """Raise unless POT's exact solver reached the optimum."""
    code = log["result_code"]
    if code == _MAX_ITER_REACHED:
        raise RuntimeError(
            f"W2: the exact OT solver hit its iteration cap (max_iterations={max_iterations}) "
            "before the optimum; its value would be wrong"
        )
    if code != _OPTIMAL:
        raise RuntimeError(f"W2: the exact OT solver failed ({log['warning']})")


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Unbiased squared MMD with the sum of RBF kernels ``exp(-|a - b|^2 / (2 h^2))`` over ``h``.

    x: (N, *D), y: (M, *D) with N, M >= 2: the unbiased within-set terms average over the
    N (N - 1) pairs of distinct points, which a set of one point does not have.
    """
    x, y = x.detach().double().flatten(1), y.detach().double().flatten(1)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise UsageError(
            f"MMD needs at least 2 points in each set (its unbiased estimate averages over pairs "
            f"of distinct points), got {n} and {m}"
        )

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())
