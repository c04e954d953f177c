"""Adaptive ODE solvers: the step size follows an error estimate, not a grid (torchdiffeq)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdiff.samplers.ode import RHS, ODEIntegrator, State
from flowdiff.utils import UsageError


def per_sample_rms(error: State) -> Tensor:
    """The error norm of a batch: ``max_{part, b} rms(part[b])``, the RMS over each sample's own
    coordinates of each part of the state (a tensor, or a tuple of parts each (B, ...)), the
    largest over samples and parts.

    Every sample meets the tolerance as if it were solved alone: torchdiffeq's RMS over the whole
    batch would let one sample's error hide among a thousand. Every part meets it on its own, as
    in torchdiffeq's norm of a tuple state (the max over parts): one RMS over all D + 1 values of
    the likelihood's ``(x, log-det)`` would weigh the log-det by 1 / (D + 1), its tolerance
    sqrt(D + 1) times looser (28x on MNIST)."""
    parts = error if isinstance(error, tuple) else (error,)
    b = parts[0].shape[0]
    return torch.stack([p.reshape(b, -1).square().mean(1).sqrt().max() for p in parts]).max()


class TooManySteps(Exception):
    """A solve that used up its ``max_steps``."""


def step_budget(f: RHS, max_steps: int) -> RHS:
    """``f``, refusing to run past ``max_steps`` attempted steps of the whole solve: dopri5
    evaluates f twice to choose its first step, then 6 times a step, accepted or not (the 7th
    stage is the next step's first). torchdiffeq's own ``max_num_steps`` counts again from 0 at
    every output time, so with 101 of them it would allow 100 times as many."""
    calls, limit = 0, 2 + 6 * max_steps

    def counted(t: Tensor, y: State) -> State:
        nonlocal calls
        calls += 1
        if calls > limit:
            raise TooManySteps(f"more than {max_steps} steps")
        return f(t, y)

    return counted


class Dopri5Sampler(ODEIntegrator):
    """Dormand–Prince 5(4) with adaptive steps (torchdiffeq's ``dopri5``).

    A step is accepted when its error estimate ``e`` satisfies ``rms(e / (atol + rtol |y|)) <= 1``
    for every sample of the batch (:func:`per_sample_rms`); the next step size follows the
    estimate. There is no step count and no grid: the NFE is what the field was asked for (6 a
    step, first-same-as-last, plus 2 to choose the first step, plus the rejected steps), and a
    batch takes the steps its hardest sample needs, so chunks of one run may differ. The steps end
    exactly at ``t_1``: the field is never evaluated beyond the interval. More than
    ``max_steps`` (10,000) steps in the whole solve is an error (a right-hand side that is not
    deterministic, such as Hutchinson probes drawn afresh at every call, never lets the error
    estimate settle).

    ``return_trajectory`` gives the states at ``trajectory_points`` (101) evenly spaced times from
    ``t_0`` to ``t_1``, read off the solver's dense output (no extra NFE); fixed times let chunks
    with different steps stack. For the likelihood it integrates tuple states like the fixed-grid
    solvers (:meth:`integrate`).

    Args:
        atol: absolute tolerance, > 0.
        rtol: relative tolerance, > 0.
    """

    name = "dopri5"
    trajectory_points = 101
    max_steps = 10_000  # a field dopri5 cannot follow is an error, not an endless loop

    def __init__(self, atol: float = 1e-5, rtol: float = 1e-5):
        for key, value in (("atol", atol), ("rtol", rtol)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsageError(f"{key} must be a number > 0, got {value!r}")
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{key} must be a finite number > 0, got {value}")
        self.atol, self.rtol = float(atol), float(rtol)

    @property
    def label(self) -> str:
        """``dopri5-atol1e-05-rtol1e-05``: progress bars and file names."""
        return f"{self.short_name}-atol{self.atol:g}-rtol{self.rtol:g}"

    def integrate(
        self, f: RHS, y_0: State, t_0: float, t_1: float, return_trajectory: bool = False
    ) -> tuple[State, Tensor | State | None]:
        """Integrate ``dy/dt = f(t, y)`` from ``t_0`` to ``t_1`` (backward when ``t_1 < t_0``).
        With ``return_trajectory``, the states at the evenly spaced times (a tuple of stacked
        parts for a tuple state)."""
        from torchdiffeq import odeint

        like = y_0[0] if isinstance(y_0, tuple) else y_0
        points = self.trajectory_points if return_trajectory else 2
        ts = torch.linspace(t_0, t_1, points, dtype=torch.float64, device=like.device)
        options = {
            "norm": per_sample_rms,
            "step_t": ts[-1:],  # land on t_1, never past it
            "max_num_steps": self.max_steps,
        }
        counted = step_budget(f, self.max_steps)
        try:
            ys = odeint(
                counted, y_0, ts, rtol=self.rtol, atol=self.atol, method="dopri5", options=options
            )
        except (AssertionError, TooManySteps) as err:  # AssertionError: torchdiffeq giving up
            raise RuntimeError(f"{self!r} gave up between t = {t_0:g} and {t_1:g}: {err}") from err
        if isinstance(ys, tuple):
            return tuple(y[-1] for y in ys), ys if return_trajectory else None
        return ys[-1], ys if return_trajectory else None
