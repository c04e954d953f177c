"""Couplings: which noise ``x_0`` each data point ``x_1`` of a training batch is paired with.

The path draws ``x_t = alpha_t x_1 + beta_t x_0`` from a pair ``(x_0, x_1)``; any joint law of the
pair whose marginals are ``N(0, I)`` and ``p_data`` gives a field that carries one to the other.
The independent coupling (the default) pairs them as drawn. Minibatch optimal transport (Tong et
al. 2023, "Improving and generalizing flow-based generative models with minibatch optimal
transport"; Pooladian et al. 2023, "Multisample flow matching") re-pairs the B noise draws with
the B data points of a batch by the plan ``pi`` that minimises
``sum_ij pi_ij ||x_0^i - x_1^j||^2`` (flattened samples), which makes the conditional paths cross
less, the learned field straighter, and few-step sampling more accurate.

The plan is computed per batch and, under DDP, per rank: each rank couples its own batch, nothing
is gathered. Labelled batches are coupled within each label (:meth:`Coupling.__call__`).

The ``stored`` coupling pairs each data point with the noise the data holds for it: the couplings
``(x_0, x_1)`` of a teacher's ODE that ``flowdiff reflow`` writes (rectified flow, Liu et al. 2022,
"Flow Straight and Fast"); the other couplings draw fresh noise and ignore stored noise.

Choose one by its alias (:data:`COUPLINGS`: ``independent``, ``ot``, ``ot-sinkhorn``, ``stored``),
its class name, or a ``class_path`` with ``init_args`` in YAML.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from flowdiff.config import Recorded, call_repr, resolve
from flowdiff.utils import UsageError


def squared_distances(x_0: Tensor, x_1: Tensor) -> Tensor:
    """``C_ij = ||x_0^i - x_1^j||^2`` of flattened samples, in float64. x_0, x_1: (B, *D)."""
    x_0, x_1 = x_0.flatten(1).double(), x_1.flatten(1).double()
    return torch.cdist(x_0, x_1).square()


class Coupling(Recorded):
    """Base class: ``coupling(x_0, x_1, labels, generator) -> x_0`` re-paired with ``x_1``.

    A subclass implements :meth:`pairing` for one group of samples.
    """

    name: str = ""
    needs_stored: bool = False  # whether it takes x_0 from the data (the datamodule must store it)

    def __call__(
        self,
        x_0: Tensor,
        x_1: Tensor,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        stored: Tensor | None = None,
    ) -> Tensor:
        """The noise ``x_0[index]`` such that row j pairs with ``x_1[j]``. x_0, x_1: (B, *D).
        ``stored`` (B, *D): the noise the data holds, if any; only :class:`StoredCoupling`
        uses it.

        With ``labels`` (B,), noise is paired with data of one label only, group by group: a
        sample never takes noise the coupling gave another class. The module passes the labels
        after label dropout, so the null label is a group of its own and the unconditional
        branch ``u(x|null)`` learns the coupling of noise with the whole data distribution (its
        group holds data of every class), each class's branch that of noise with its class.
        """
        if labels is None:
            return x_0[self.pairing(x_0, x_1, generator)]
        index = torch.empty(len(x_1), dtype=torch.long, device=x_1.device)
        for label in labels.unique():
            members = (labels == label).nonzero().squeeze(1)
            index[members] = members[self.pairing(x_0[members], x_1[members], generator)]
        return x_0[index]

    def pairing(self, x_0: Tensor, x_1: Tensor, generator: torch.Generator | None) -> Tensor:
        """``index`` (B,) on x_1's device: ``x_0[index[j]]`` pairs with ``x_1[j]``."""
        raise NotImplementedError

    __repr__ = call_repr


class IndependentCoupling(Coupling):
    """``(x_0, x_1)`` as drawn: ``x_0 ~ N(0, I)`` independent of ``x_1`` (plain CFM)."""

    name = "independent"

    def __call__(self, x_0, x_1, labels=None, generator=None, stored=None) -> Tensor:
        return x_0

    def pairing(self, x_0, x_1, generator=None) -> Tensor:
        return torch.arange(len(x_1), device=x_1.device)


class ExactOTCoupling(Coupling):
    """The exact minibatch OT plan (POT's network simplex, ``ot.emd``), a permutation.

    With uniform weights on B points each, the optimal plan is a permutation matrix divided by B
    (Birkhoff-von Neumann), and the simplex returns such a vertex: data point j takes the noise
    ``argmax_i pi_ij``. Deterministic. ``ot.emd`` runs on the CPU in O(B^3) at worst.
    """

    name = "ot"

    def pairing(self, x_0, x_1, generator=None) -> Tensor:
        cost = squared_distances(x_0, x_1).cpu().numpy()
        weights = np.full(len(cost), 1.0 / len(cost))
        index = ot.emd(weights, weights, cost, numItermax=1_000_000).argmax(0)
        if len(np.unique(index)) != len(index):  # a degenerate plan: the assignment solver
            index = linear_sum_assignment(cost.T)[1]
        return torch.as_tensor(index, dtype=torch.long, device=x_1.device)


class SinkhornCoupling(Coupling):
    """Entropic minibatch OT (``ot.sinkhorn``), pairs drawn from its plan.

    The plan minimises ``<pi, C / mean(C)> + reg sum_ij pi_ij log pi_ij``: ``reg`` is relative to
    the batch's mean squared distance, so one value suits any data scale. As ``reg -> 0`` the plan
    tends to the exact one (its cost exceeds the exact plan's by at most ``reg mean(C) log B``);
    large ``reg`` tends to the independent coupling. Each data point j draws its noise
    ``i ~ pi_ij / sum_i pi_ij``: every data point (and label) is used once, and the pair (i, j) has
    probability ``pi_ij``, as in Tong et al.'s pair sampling.

    Runs in float64 with NumPy on the CPU, with torch on a GPU. Too small a ``reg`` underflows
    ``exp(-C / (reg mean(C)))``; that is an error, not a silent fallback.

    Args:
        reg: entropic regularisation relative to the mean cost, > 0.
    """

    name = "ot-sinkhorn"

    def __init__(self, reg: float = 0.05):
        if not reg > 0:
            raise UsageError(f"sinkhorn coupling needs reg > 0, got reg={reg}")
        self.reg = float(reg)

    def plan(self, x_0: Tensor, x_1: Tensor) -> Tensor:
        """The entropic plan ``pi`` (B, B) in float64, rows: noise, columns: data."""
        cost = squared_distances(x_0, x_1)
        cost = cost / cost.mean().clamp_min(torch.finfo(cost.dtype).tiny)
        weights = torch.full((len(cost),), 1.0 / len(cost), dtype=cost.dtype, device=cost.device)
        if cost.device.type == "cpu":  # POT's NumPy backend is ~2x faster than torch on a CPU
            cost, weights = cost.numpy(), weights.numpy()
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # underflow is checked below
            warnings.simplefilter("ignore")
            plan = ot.sinkhorn(weights, weights, cost, self.reg, numItermax=10_000, warn=False)
        plan = torch.as_tensor(plan, device=x_1.device)
        if not (plan.isfinite().all() and (plan.sum(0) > 0).all()):
            raise UsageError(
                f"the sinkhorn coupling failed at reg={self.reg} (exp(-cost / reg) underflows "
                "for this batch); raise reg, or use the exact coupling 'ot'"
            )
        return plan

    @staticmethod
    def draw(plan: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``index[j] ~ pi_ij / sum_i pi_ij``, one draw for each data point j. plan: (B, B)."""
        return torch.multinomial(plan.T, 1, generator=generator).squeeze(1)

    def pairing(self, x_0, x_1, generator=None) -> Tensor:
        return self.draw(self.plan(x_0, x_1), generator)


class StoredCoupling(Coupling):
    """``(x_0, x_1)`` as the data stores them: ``x_0`` is the noise a teacher's ODE carried to
    ``x_1`` (:class:`flowdiff.data.reflow.ReflowDataModule`); training on them is the k-rectified
    flow. Data without stored noise is refused."""

    name = "stored"
    needs_stored = True

    def __call__(self, x_0, x_1, labels=None, generator=None, stored=None) -> Tensor:
        if stored is None:
            raise UsageError(
                "model.coupling stored needs data that stores the noise of each sample "
                "(flowdiff reflow's output with flowdiff.data.reflow.ReflowDataModule)"
            )
        return stored.to(x_1)


COUPLINGS: dict[str, type[Coupling]] = {
    cls.name: cls
    for cls in (IndependentCoupling, ExactOTCoupling, SinkhornCoupling, StoredCoupling)
}


def get_coupling(coupling: str | Coupling) -> Coupling:
    """A coupling object as it is, or the one ``coupling`` names (an alias of :data:`COUPLINGS`,
    a class name or a class path) with its default arguments."""
    if isinstance(coupling, Coupling):
        return coupling
    return resolve(coupling, Coupling, COUPLINGS)()
