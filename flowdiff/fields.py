"""Fields: what samplers integrate. ``velocity(x, t)``, ``score(x, t)`` and both at once.

``ModelField`` turns a trained network into a field through the path's conversions, with
classifier-free guidance. Samplers see only this interface: no labels, no Lightning. The exact
field of a Gaussian mixture, for tests, is ``flowdiff.testing.GaussianMixtureField``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdiff.conditions import cat_conditions, null_condition
from flowdiff.paths import GaussianConditionalPath, Prediction
from flowdiff.utils import UsageError, as_time, expand_like


class Field:
    """Interface of a field over the path ``path``."""

    path: GaussianConditionalPath

    def velocity_and_score(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.velocity_and_score(x, t)[0]

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        return self.velocity_and_score(x, t)[1]

    def average_velocity(self, x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """``(x_r - x) / (r - t)`` along the field's ODE through ``x`` at t (MeanFlow's ``u``).
        Only fields of an average-velocity network have it."""
        raise UsageError(f"{type(self).__name__} has no average velocity")


def guide(out_null: Tensor, out_cond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance: ``(1 - w) out(x|null) + w out(x|y)``."""
    return out_null + guidance * (out_cond - out_null)


def check_interval(interval) -> tuple[float, float]:
    """``(a, b)`` with ``0 <= a <= b <= 1``, or a UsageError naming the problem."""
    try:
        a, b = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UsageError(f"a guidance interval is two times a,b; got {interval!r}") from None
    if not 0.0 <= a <= b <= 1.0:
        raise UsageError(f"a guidance interval needs 0 <= a <= b <= 1, got {a:g},{b:g}")
    return a, b


class ModelField(Field):
    """A network ``net(x, t, y)`` viewed as a velocity and a score.

    Args:
        net: network with ``forward(x, t, y=None) -> tensor shaped like x``.
        path: the path it was trained on; converts its prediction to velocity and score.
        prediction: what the network outputs (``velocity``, ``score`` or ``noise``).
        y: labels (B,) or encoded captions (:class:`flowdiff.text.TextCondition`) to condition
            on, or None for an unconditional field.
        guidance: CFG scale ``w``; with labels, the null and conditional branches are evaluated in
            one batched forward pass of size 2B, combined as ``(1 - w) out(x|null) + w out(x|y)``.
            ``None`` (or 1 with labels) evaluates the conditional branch only, 0 the null branch.
        null_label: index of the null class (the network's ``num_classes``); for text the null
            condition is the empty caption (:mod:`flowdiff.text.condition`).
        guidance_interval: ``(a, b)``: guide only at times ``a <= t <= b`` (Kynkäänniemi et al.
            2024); elsewhere the field is the conditional branch alone, one forward of size B.
            The NFE counts field evaluations either way (CFG doubles the batch, not the NFE).
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianConditionalPath,
        prediction: Prediction,
        y: Tensor | None = None,
        guidance: float | None = None,
        null_label: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ):
        if guidance is not None and y is None:
            raise UsageError("guidance needs labels to condition on")
        if guidance is not None and guidance != 1.0 and null_label is None:
            raise UsageError("guidance needs a model trained with a null label")
        self.net, self.path, self.prediction = net, path, prediction
        self.y, self.guidance, self.null_label = y, guidance, null_label
        self.guidance_interval = None
        if guidance_interval is not None:
            self.guidance_interval = check_interval(guidance_interval)

    def output(self, x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        """The (guided) network prediction at ``(x, t)`` (over [t, r] with ``r``: MeanFlow)."""
        t = as_time(t, x)

        def net(x, t, y, r):
            return self.net(x, t, y) if r is None else self.net(x, t, y, r=r)

        if self.y is None or self.guidance is None or self.guidance == 1.0:
            return net(x, t, self.y, r)
        inside = None
        if self.guidance_interval is not None:
            a, b = self.guidance_interval
            inside = (t >= a) & (t <= b)
            if not inside.any():  # w = 1 here: the conditional branch alone
                return net(x, t, self.y, r)
            if inside.all():
                inside = None
        null = null_condition(self.y, self.null_label)
        if self.guidance == 0.0 and inside is None:  # the unconditional field alone: one forward
            return net(x, t, null, r)
        r2 = torch.cat([r, r]) if r is not None else None
        out = net(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(null, self.y), r2)
        out_null, out_cond = out.chunk(2)
        guided = guide(out_null, out_cond, self.guidance)
        if inside is None:
            return guided
        return torch.where(expand_like(inside, x), guided, out_cond)  # times differ in the batch

    def average_velocity(self, x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """``u(x, t, r)``: the average velocity over [t, r] of an interval network (MeanFlow);
        a jump is ``x_r = x + (r - t) u``. Guidance combines the branches as for a velocity."""
        if self.prediction != "velocity" or not getattr(self.net, "interval", False):  # contract
            raise UsageError(
                "this sampler needs an average-velocity network (trained with the MeanFlow "
                "objective, model.net.init_args.interval true)"
            )
        return self.output(x, t, as_time(r, x))

    def velocity_and_score(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = as_time(t, x)
        return self.path.to_velocity_and_score(self.output(x, t), self.prediction, x, t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = as_time(t, x)
        out = self.output(x, t)
        if self.prediction == "velocity":
            return out
        return self.path.to_velocity_and_score(out, self.prediction, x, t)[0]
