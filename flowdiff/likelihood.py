"""Exact log-likelihoods of flow models through the instantaneous change of variables (MATH.md).

Along the ODE ``dX_t = u_t(X_t) dt``, ``d/dt log p_t(X_t) = -div u_t(X_t)``, so integrating
backward from ``x_1 = x`` to ``x_0``::

    log p_1(x) = log N(x_0; 0, I) - int_0^1 div u_t(x_t) dt

``log_likelihood`` integrates this augmented ODE with a solver of :mod:`flowdiff.samplers`, the
divergence computed exactly (one autograd pass per dimension: points) or by Hutchinson's estimator
(one vector-Jacobian product per probe: images). ``flowdiff.metrics.pixels`` turns the density
of an 8-bit image into bits per dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowdiff.fields import Field
from flowdiff.samplers import CountingField, FixedGridSampler, ODEIntegrator, RK4Sampler
from flowdiff.utils import UsageError

Divergence = Literal["exact", "hutchinson"]
ProbeDistribution = Literal["rademacher", "gaussian"]

DIVERGENCES = ("exact", "hutchinson")
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    """``log p_{t_end}(x)`` (B,), the point ``x_0`` (B, *D) the backward ODE reached at
    ``t_start``, and the number of velocity evaluations (NFE) used."""

    log_prob: Tensor
    x_0: Tensor
    nfe: int


def log_likelihood(
    field: Field,
    x: Tensor,
    solver: ODEIntegrator | None = None,
    t_start: float | None = None,
    t_end: float = 1.0,
    divergence: Divergence = "exact",
    probes: int = 1,
    generator: torch.Generator | None = None,
    probe_distribution: ProbeDistribution = "rademacher",
) -> LikelihoodResult:
    """``log p_{t_end}(x) = log N(x_0; 0, I) - int_{t_start}^{t_end} div u_t(x_t) dt``.

    The augmented ODE ``d/dt [x_t, l_t] = [u_t(x_t), div u_t(x_t)]`` is integrated backward from
    ``x_{t_end} = x, l = 0`` to ``t_start`` by ``solver`` (any ODE sampler of
    :mod:`flowdiff.samplers`, fixed-grid or adaptive; RK4 with 100 uniform steps by default), the
    same solver layer that draws samples; then ``log p = log N(x_0; 0, I) + l``.

    Time range. A trained model is only defined on ``[t_min, t_max]`` of its path (a score or
    noise network cannot be turned into a velocity at t = 0), so ``t_start`` defaults to
    ``field.path.t_min``, where ``p_{t_min} ~= N(0, I)`` and where the samplers start. With
    ``t_start = 0`` the result is ``log p_1`` of the path itself up to the discretisation, for any
    field finite at t = 0.

    Divergence. ``"exact"`` sums ``d u_i / d x_i`` over the D dimensions, one autograd pass each
    (points). ``"hutchinson"`` estimates it as the mean over ``probes`` probes ``v`` of
    ``v^T (du/dx) v``, one vector-Jacobian product each; ``E[v v^T] = I`` makes it unbiased.
    Rademacher probes (the default) have the smaller variance. The probes are drawn afresh from
    ``generator`` at every evaluation: the state never depends on the estimate, so the result is
    a quadrature of ``div u`` along a deterministic trajectory, and independent probes at its
    nodes make its variance fall like ``1 / steps``. An adaptive solver (``dopri5``) needs a
    deterministic right-hand side to estimate its error, so with one the probes are drawn once
    and kept for the whole integration, as FFJORD does.

    The divergence is computed under ``torch.enable_grad()`` outside inference mode, so this works
    inside ``torch.no_grad()`` and Lightning's evaluation loops; the state is detached between
    evaluations. The network must treat the samples of a batch independently (the divergence of
    each sample is read off gradients of batch sums). The result is not differentiable.

    Returns:
        ``LikelihoodResult``: ``log_prob`` (B,) in x's dtype, ``x_0`` (B, *D) and the NFE.
    """
    solver = RK4Sampler(100) if solver is None else solver
    if not isinstance(solver, ODEIntegrator):
        raise UsageError(f"the likelihood needs an ODE solver, got {solver!r}")
    if divergence not in DIVERGENCES:
        raise UsageError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if probe_distribution not in PROBE_DISTRIBUTIONS:
        raise UsageError(
            f"unknown probe_distribution {probe_distribution!r}; "
            f"expected one of {PROBE_DISTRIBUTIONS}"
        )
    if int(probes) != probes or probes < 1:
        raise UsageError(f"probes must be a positive integer, got {probes}")
    if x.ndim < 2 or not x.is_floating_point():
        raise UsageError(f"x must be a floating tensor (B, *D), got {x.dtype} {tuple(x.shape)}")
    t_start = field.path.t_min if t_start is None else float(t_start)
    if not 0.0 <= t_start < t_end <= 1.0:
        raise UsageError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")
    probes = int(probes)
    counted = CountingField(field)

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(False), torch.enable_grad():
            x_in = state[0].detach().clone().requires_grad_(True)
            u = counted.velocity(x_in, t.expand(x_in.shape[0]))
            if divergence == "exact":
                div_u = exact_divergence(u, x_in)
            else:
                v = fixed_probes
                if v is None:
                    v = draw_probes((probes, *x_in.shape), x_in, probe_distribution, generator)
                div_u = hutchinson_divergence(u, x_in, v)
        return u.detach(), div_u.detach()

    with torch.inference_mode(False):
        fixed_probes = None  # drawn once for an adaptive solver
        if divergence == "hutchinson" and not isinstance(solver, FixedGridSampler):
            fixed_probes = draw_probes((probes, *x.shape), x, probe_distribution, generator)
        x_t = x.detach().clone()
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        (x_0, log_det), _ = solver.integrate(rhs, (x_t, log_det), t_end, t_start)
        log_prob = standard_normal_log_prob(x_0) + log_det
    return LikelihoodResult(log_prob=log_prob, x_0=x_0, nfe=counted.nfe)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I) = -|x|^2 / 2 - D / 2 log(2 pi)``. x: (B, *D). Returns (B,)."""
    d = x[0].numel()
    return -0.5 * x.flatten(1).square().sum(1) - 0.5 * d * math.log(2 * math.pi)


def exact_divergence(u: Tensor, x: Tensor) -> Tensor:
    """``div u = sum_i d u_i / d x_i`` by D autograd passes (one per dimension).

    u: (B, *D), computed from x (B, *D) with the samples independent. Returns (B,).
    """
    u_flat = u.flatten(1)
    div_u = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    if not u.requires_grad:  # the field does not depend on x
        return div_u
    for i in range(u_flat.shape[1]):
        (grad,) = torch.autograd.grad(
            u_flat[:, i].sum(), x, retain_graph=True, materialize_grads=True
        )
        div_u = div_u + grad.flatten(1)[:, i]
    return div_u


def hutchinson_divergence(u: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """Hutchinson's estimate ``mean_p v_p^T (du/dx) v_p``, one vector-Jacobian product per probe.

    u, x: (B, *D); v: (P, B, *D) probes with ``E[v v^T] = I``. Returns (B,).
    """
    estimate = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    if not u.requires_grad:  # the field does not depend on x
        return estimate
    for v_p in v:
        (vjp,) = torch.autograd.grad(u, x, v_p, retain_graph=True, materialize_grads=True)
        estimate = estimate + (vjp * v_p).flatten(1).sum(1)
    return estimate / v.shape[0]


def draw_probes(
    shape: tuple[int, ...],
    like: Tensor,
    distribution: ProbeDistribution = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Probes ``v`` with ``E[v v^T] = I`` of ``shape``, in ``like``'s dtype and on its device.

    Drawn where the generator lives (a CPU generator for a GPU tensor), so a seed fixes them.
    """
    device = generator.device if generator is not None else like.device
    if distribution == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device, dtype=like.dtype)
        v = 2 * v - 1
    elif distribution == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    else:
        raise UsageError(
            f"unknown probe distribution {distribution!r}; expected one of {PROBE_DISTRIBUTIONS}"
        )
    return v.to(like.device)
