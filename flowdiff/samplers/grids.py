"""Time grids of the fixed-step samplers: ``s_0 = 0 < s_1 < ... < s_N = 1`` on the unit interval,
mapped to ``t_i = t_0 + (t_1 - t_0) s_i`` between the start and end times of the integration.

flowdiff's time runs from noise (t = 0) to data (t = 1). The grids from the diffusion literature
are written in a noise level; on the linear path ``x_t = t z + (1 - t) eps`` the scaled state
``x_t / t = z + sigma eps`` has the noise level ``sigma = (1 - t) / t``, so ``t = 1 / (1 + sigma)``.
That map turns EDM's rho-grid and SD3's shift into flow times (:class:`EDMGrid`,
:class:`ShiftGrid`). The grids are fractions of the interval shared by every schedule.

On the command line a grid is ``NAME`` or ``NAME:VALUE`` (:func:`parse_grid`): ``uniform``,
``edm`` (``edm:5``: rho = 5), ``shift:3``, ``power:2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdiff.config import Recorded, call_repr
from flowdiff.utils import UsageError


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"grid {name} must be a finite number > 0, got {value!r}")
    if not value > 0:
        raise UsageError(f"grid {name} must be > 0, got {value}")
    return float(value)


class TimeGrid(Recorded):
    """Base class: ``grid(steps) -> (steps + 1,)`` float64 fractions from 0 to 1."""

    name: str = ""

    def __call__(self, steps: int) -> Tensor:
        raise NotImplementedError

    def times(self, steps: int, t_0: float, t_1: float, like: Tensor) -> Tensor:
        s = self(steps)
        return (t_0 + (t_1 - t_0) * s).to(dtype=like.dtype, device=like.device)

    @property
    def label(self) -> str:
        """The short form ``NAME[:VALUE]`` that :func:`parse_grid` reads (tables, file names)."""
        args = list(self.init_args.values())
        return f"{self.name}:{args[0]:g}" if args else self.name

    __repr__ = call_repr


class UniformGrid(TimeGrid):
    """Equal steps."""

    name = "uniform"

    def __call__(self, steps: int) -> Tensor:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


class PowerGrid(TimeGrid):
    """``s_i = (i / N)^power``: with ``power > 1`` the steps shrink towards the start ``t_0``.

    The likelihood integrates backward from t = 1, where an image model's field is stiff (most
    pixels are exactly 0): power 2 puts its small steps there.
    """

    name = "power"

    def __init__(self, power: float = 2.0):
        if isinstance(power, bool) or not isinstance(power, int | float) or not power >= 1:
            raise UsageError(f"grid power must be >= 1, got {power}")
        self.power = float(power)

    def __call__(self, steps: int) -> Tensor:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** self.power


class EDMGrid(TimeGrid):
    """EDM's rho-grid (Karras et al. 2022, eq. 5) in flow time, through ``t = 1 / (1 + sigma)``.

    EDM's N steps run over ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho``, ``i = 0..N-1``, then ``sigma_N = 0``. Here ``s_i = 1 / (1 +
    sigma_i)`` for ``0 < i <= N``, and ``s_0 = 0``: EDM starts from ``N(0, sigma_max^2 I)`` as a
    stand-in for pure noise (``t(80) = 1/81``); flowdiff starts from the noise itself. The steps
    are small at both ends (10 steps: 0, 0.023, 0.045, 0.093, 0.197, 0.400, 0.680, 0.896, 0.980,
    0.998, 1). ``N = 1`` is the single step [0, 1].

    Why the noise level and not the EDM formula on the unit interval (``1 - s_i = (1 -
    i/N)^rho``, sigma_min = 0): that puts half the interval in the first of 10 steps and makes
    the last three shorter than 2e-4 together; rho spaces steps well only in a noise level that
    spans decades, as ``sigma`` does.

    Args:
        rho: the spacing's exponent (EDM: 7; 1 spaces ``sigma`` evenly).
        sigma_min: the low end of EDM's noise range (0.002).
        sigma_max: its high end (80).
    """

    name = "edm"

    def __init__(self, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.rho = _positive("rho", rho)
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise UsageError(f"grid needs sigma_min < sigma_max, got {sigma_min} and {sigma_max}")

    def sigmas(self, steps: int) -> Tensor:
        """EDM's ``sigma_0 = sigma_max, ..., sigma_{N-1} = sigma_min`` (float64)."""
        i = torch.arange(steps, dtype=torch.float64)
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (hi + i / max(steps - 1, 1) * (lo - hi)) ** self.rho

    def __call__(self, steps: int) -> Tensor:
        s = torch.ones(steps + 1, dtype=torch.float64)
        s[1:steps] = 1 / (1 + self.sigmas(steps)[1:])
        s[0] = 0.0
        return s


class ShiftGrid(TimeGrid):
    """SD3's timestep shift (Esser et al. 2024, "resolution-dependent shifting") of the uniform
    grid: ``s' = s / (s + shift (1 - s))``; ``shift > 1`` moves steps towards the noise.

    SD3 writes time the other way (its ``tau = 1 - t`` is 0 at data, 1 at noise) and shifts it as
    ``tau' = shift tau / (1 + (shift - 1) tau)``; with ``tau = 1 - t`` that is the formula above,
    which multiplies the noise level ``sigma = (1 - t) / t`` by ``shift``. (Applied to flowdiff's
    t as written, SD3's formula would move steps towards the data instead.) ``shift = 3`` (SD3 at
    1024^2) puts half of the steps below t = 0.25; ``shift = 1`` is uniform.

    Args:
        shift: the factor on the noise level, > 0.
    """

    name = "shift"

    def __init__(self, shift: float = 3.0):
        self.shift = _positive("shift", shift)

    def __call__(self, steps: int) -> Tensor:
        s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        return s / (s + self.shift * (1 - s))


GRIDS: dict[str, type[TimeGrid]] = {
    cls.name: cls for cls in (UniformGrid, EDMGrid, ShiftGrid, PowerGrid)
}


def parse_grid(text: str) -> TimeGrid:
    """The grid ``NAME`` or ``NAME:VALUE`` names: ``uniform``, ``edm``, ``edm:5`` (rho), ``shift``
    (3), ``shift:2.5``, ``power:2``; the value is the grid's first argument."""
    name, colon, value = str(text).strip().partition(":")
    if name not in GRIDS:
        raise UsageError(f"unknown grid {text!r}; expected one of {sorted(GRIDS)}, e.g. edm:7")
    cls = GRIDS[name]
    if not colon:
        return cls()
    if cls is UniformGrid:
        raise UsageError(f"grid uniform takes no value, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"grid {text!r}: {value!r} is not a number") from None
    return cls(number)
