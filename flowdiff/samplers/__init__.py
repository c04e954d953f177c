"""Samplers: integrate a field from noise ``x_0 ~ N(0, I)`` at ``t_0`` to data at ``t_1``.

``sampler.sample(field, x_0, t_0, t_1) -> SampleResult(x, trajectory, nfe)`` (:mod:`.base`).
Fixed-grid solvers are one family (:mod:`.ode`, :mod:`.sde`, time grids in :mod:`.grids`); the
adaptive ``dopri5`` (:mod:`.adaptive`) implements :meth:`Sampler.solve` the same way and its NFE
is counted alike; ``meanflow`` (:mod:`.meanflow`) jumps along an average-velocity model.
Every ODE solver integrates tuple states too (:class:`ODEIntegrator`), which is what the
likelihood needs.
Choose one in YAML by ``class_path`` (``flowdiff.samplers.HeunSampler``), by class name
(``HeunSampler``) or by its short alias (``heun``: :data:`SAMPLERS`).
"""

from flowdiff.config import resolve
from flowdiff.samplers.adaptive import Dopri5Sampler
from flowdiff.samplers.base import CountingField, Sampler, SampleResult
from flowdiff.samplers.grids import (
    GRIDS,
    EDMGrid,
    PowerGrid,
    ShiftGrid,
    TimeGrid,
    UniformGrid,
    parse_grid,
)
from flowdiff.samplers.meanflow import MeanFlowSampler
from flowdiff.samplers.ode import (
    EulerSampler,
    FixedGridSampler,
    HeunSampler,
    MidpointSampler,
    ODEIntegrator,
    ODESampler,
    RK4Sampler,
)
from flowdiff.samplers.sde import EulerMaruyamaSampler
from flowdiff.utils import UsageError

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        EulerSampler, HeunSampler, MidpointSampler, RK4Sampler, EulerMaruyamaSampler, Dopri5Sampler,
        MeanFlowSampler,
    )
}  # fmt: skip


def sampler_class(name: str) -> type[Sampler]:
    """The sampler class ``name`` means: an alias (``heun``), a class name or a class path."""
    return resolve(name, Sampler, SAMPLERS)


def with_args(sampler: Sampler, name: str | None = None, **overrides) -> Sampler:
    """``sampler`` rebuilt with ``overrides`` (arguments left None are not overrides), or the
    sampler ``name`` built with the arguments of ``sampler`` that it takes, then ``overrides``.

    ``flowdiff sample`` and ``evaluate`` start from the checkpoint's own sampler this way: a model
    trained with ``EulerMaruyamaSampler(sigma=0.5)`` samples at sigma = 0.5 unless told otherwise.
    """
    import inspect

    overrides = {k: v for k, v in overrides.items() if v is not None}
    cls = type(sampler) if name is None else sampler_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        adaptive = "" if issubclass(cls, FixedGridSampler) else " (adaptive: atol and rtol set it)"
        raise UsageError(f"sampler {cls.__name__} takes no {', '.join(unknown)}{adaptive}")
    kept = {k: v for k, v in sampler.init_args.items() if k in accepted}
    return cls(**{**kept, **overrides})


def get_sampler(name: str, steps: int | None = None, **kwargs) -> Sampler:
    """The sampler ``name`` with ``steps`` steps (fixed-grid samplers: 100 by default) and its
    other arguments."""
    cls = sampler_class(name)
    if issubclass(cls, FixedGridSampler):
        kwargs["steps"] = 100 if steps is None else steps
    elif steps is not None:
        raise UsageError(f"sampler {name!r} is adaptive: it takes no steps (atol and rtol set it)")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise UsageError(f"sampler {name!r}: {err}") from None


__all__ = [
    "GRIDS",
    "SAMPLERS",
    "CountingField",
    "Dopri5Sampler",
    "EDMGrid",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "FixedGridSampler",
    "MeanFlowSampler",
    "HeunSampler",
    "MidpointSampler",
    "ODEIntegrator",
    "ODESampler",
    "PowerGrid",
    "RK4Sampler",
    "SampleResult",
    "Sampler",
    "ShiftGrid",
    "TimeGrid",
    "UniformGrid",
    "get_sampler",
    "parse_grid",
    "sampler_class",
    "with_args",
]
