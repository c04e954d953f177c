"""The sampler contract: ``sampler.sample(field, x_0, t_0, t_1) -> SampleResult``.

A sampler integrates a field from ``x_0`` at ``t_0`` to ``t_1``. It knows nothing of labels,
networks or Lightning (guidance lives in the field). The number of function evaluations (NFE) is
counted as the field is called, never computed from a step count, so fixed-grid and adaptive
solvers report it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowdiff.config import Recorded
from flowdiff.fields import Field


@dataclass
class SampleResult:
    """Final samples (B, *D), the states at the solver's times (T, B, *D) when asked for, and the
    number of field evaluations one sample's trajectory used."""

    x: Tensor
    trajectory: Tensor | None
    nfe: int


class CountingField(Field):
    """A field that counts its evaluations: one NFE per call, whatever it returns."""

    def __init__(self, field: Field):
        self.field, self.path, self.nfe = field, field.path, 0

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.field.velocity(x, t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.field.score(x, t)

    def velocity_and_score(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        return self.field.velocity_and_score(x, t)

    def average_velocity(self, x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        self.nfe += 1
        return self.field.average_velocity(x, t, r)


class Sampler(Recorded):
    """Base class of every sampler. Subclasses implement :meth:`solve`.

    A sampler is built from its arguments alone (a ``class_path`` in YAML); its ``repr`` shows all
    of them, and is what ``samples.pt`` and ``metrics.json`` record.
    """

    name: str = ""
    needs_average_velocity: bool = False  # jumps along field.average_velocity (MeanFlow)
    # x(t_1) is a function of x_0 alone (ODE solvers, MeanFlow's jumps). False: the sampler draws
    # noise from the generator as it goes (an SDE), so x_0 -> x(t_1) is no deterministic coupling.
    deterministic: bool = True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items() if v is not None)
        return f"{type(self).__name__}({args})"

    @property
    def short_name(self) -> str:
        """The alias, or the class name of a sampler without one."""
        return self.name or type(self).__name__

    @property
    def label(self) -> str:
        """A short name for progress bars and file names, e.g. ``euler-50steps``."""
        steps = getattr(self, "steps", None)
        return f"{self.short_name}-{steps}steps" if steps else self.short_name

    @torch.no_grad()
    def sample(
        self,
        field: Field,
        x_0: Tensor,
        t_0: float = 0.0,
        t_1: float = 1.0,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> SampleResult:
        """Integrate ``field`` from ``x_0`` at ``t_0`` to ``t_1``."""
        counted = CountingField(field)
        x, trajectory = self.solve(counted, x_0, t_0, t_1, return_trajectory, generator)
        return SampleResult(x, trajectory, counted.nfe)

    def solve(
        self,
        field: Field,
        x_0: Tensor,
        t_0: float,
        t_1: float,
        return_trajectory: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The samples at ``t_1`` and, if asked, the stacked states along the way."""
        raise NotImplementedError
