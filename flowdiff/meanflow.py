"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): a network of the
average velocity over an interval, trained with the MeanFlow identity, sampled in one or a few
jumps (:class:`flowdiff.samplers.MeanFlowSampler`).

**Time direction.** flowdiff's time runs from noise (t = 0) to data (t = 1); the paper's from data
(0) to noise (1). The interval's other end ``r`` is therefore *later* than ``t`` here (r >= t,
towards the data), and flowdiff's velocities are the paper's negated. With the ODE trajectory
``x_s`` of the marginal field ``v`` through ``x_t``::

    u(x_t, t, r) = 1 / (r - t) ∫_t^r v(x_s, s) ds = (x_r - x_t) / (r - t),     u(x, t, t) = v(x, t)

Differentiating ``(r - t) u(x_t, t, r) = x_r - x_t`` in t along the trajectory (x_r fixed) gives
the **MeanFlow identity** (the paper's, in either direction)::

    u(x_t, t, r) = v(x_t, t) + (r - t) d/dt u(x_t, t, r),     d/dt u = v . grad_x u + d_t u

whose right side, with the conditional velocity ``v = d_alpha_t z + d_beta_t eps`` for the
marginal one and the network for ``u``, is the stop-gradient regression target; ``d/dt u`` is one
Jacobian-vector product of the network with tangent ``(v, 1, 0)`` for ``(x, t, r)``. A jump is
``x_r = x_t + (r - t) u(x_t, t, r)``: exact for the exact u on any Gaussian path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowdiff.conditions import is_null, null_condition
from flowdiff.objectives import Objective
from flowdiff.paths import GaussianConditionalPath, PathSample, Prediction
from flowdiff.utils import UsageError, expand_like


def meanflow_target(u_fn, x_t: Tensor, t: Tensor, r: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``u = u_fn(x_t, t, r)`` and the MeanFlow target ``v + (r - t) d/dt u`` (detached), with
    ``d/dt u = v . grad_x u + d_t u`` by one forward-mode JVP (``torch.func.jvp``).

    x_t, v: (B, *D); t, r: (B,). ``u`` keeps its graph (gradients flow to the network through
    it); the target carries none. Attention (``scaled_dot_product_attention``) runs on its math
    kernel here: forward-mode AD is not implemented for the flash, memory-efficient and CPU flash
    kernels, which would raise on the first loss of any network with attention.
    """
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    with sdpa_kernel(SDPBackend.MATH):
        u, du_dt = torch.func.jvp(u_fn, (x_t, t, r), tangents)
    return u, (v + expand_like(r - t, v) * du_dt).detach()


class MeanFlow(Objective):
    """MeanFlow: ``E w || u_theta(x_t, t, r) - sg(v + (r - t) d/dt u_theta(x_t, t, r)) ||^2``.

    The network (``interval: true``) predicts the average velocity ``u(x, t, r)`` over [t, r]; at
    ``r = t`` it is the instantaneous velocity, so the model is a velocity model to every other
    sampler and to the likelihood. Times: ``t`` from the path's time sampling; with probability
    ``2 interval_fraction`` the pair is re-drawn as the sorted pair ``(t, r) = (min, max)`` of ``t``
    and a second independent draw ``t'`` when ``t' > t`` and as ``r = t`` otherwise. Conditional on
    ``r != t`` (a share of ``interval_fraction`` of the samples) the pair is distributed as the
    paper's sorted pair; the rest trains plain flow matching.

    Args:
        interval_fraction: share of samples with ``r != t``, in [0, 0.5] (the paper's ablation
            favours 0.25; 0 is flow matching).
        power: adaptive loss weight ``w = 1 / sg(||delta||^2 + eps)^power`` (the paper's p = 1;
            0: plain squared error). ``||delta||^2`` is the mean over the data dimensions.
        eps: the constant ``c`` of the adaptive weight.
        guidance: the paper's classifier-free guidance for one-step sampling (its eq. 13-16):
            samples whose label is not the null label regress on ``v~ = w v + (1 - w)
            u_theta(x_t, t, t | null)`` (no gradient through the second term) instead of ``v``, so
            the conditional network learns the guided field at w and samples it at 1 NFE with no
            guidance at sampling time. 1: no guidance (a conditional model as any other).
            Above 1 it needs a network with labels and data with label dropout (``p_uncond >
            0``, which trains the null branch it mixes in): :meth:`check` and
            :meth:`check_data` refuse it otherwise.
    """

    prediction: Prediction = "velocity"

    def __init__(
        self,
        interval_fraction: float = 0.25,
        power: float = 1.0,
        eps: float = 1e-3,
        guidance: float = 1.0,
    ):
        if not 0.0 <= interval_fraction <= 0.5:
            raise UsageError(
                f"MeanFlow interval_fraction must be in [0, 0.5], got {interval_fraction}"
            )
        if power < 0 or not eps > 0:
            raise UsageError(f"MeanFlow needs power >= 0 and eps > 0, got {power}, {eps}")
        if not guidance >= 1.0:
            raise UsageError(f"MeanFlow guidance must be >= 1 (1: none), got {guidance}")
        self.interval_fraction, self.power = float(interval_fraction), float(power)
        self.eps, self.guidance = float(eps), float(guidance)

    def __repr__(self) -> str:
        return (
            f"MeanFlow(interval_fraction={self.interval_fraction}, power={self.power}, "
            f"eps={self.eps}, guidance={self.guidance})"
        )

    def check(self, net: nn.Module, path: GaussianConditionalPath, coupling=None) -> None:
        super().check(net, path, coupling)
        if not getattr(net, "interval", False):  # the optional attribute of the Network contract
            raise UsageError(
                "the MeanFlow objective needs a network with a second time input: set "
                "model.net.init_args.interval true"
            )
        if self.guidance != 1.0 and not (
            getattr(net, "num_classes", 0) or getattr(net, "text_dim", 0)
        ):
            raise UsageError(
                f"model.objective.init_args.guidance {self.guidance:g} mixes in the field of the "
                "null label, and this network has no labels (num_classes 0) nor text; set "
                "model.objective.init_args.guidance 1, or model.net.init_args.num_classes"
            )

    def check_data(self, datamodule) -> None:
        """Guidance above 1 mixes in the null label's field, which only label dropout trains."""
        p_uncond = float(getattr(datamodule, "p_uncond", 0.0))
        if self.guidance != 1.0 and not p_uncond > 0:
            raise UsageError(
                f"model.objective.init_args.guidance {self.guidance:g} mixes in the unconditional "
                f"field, and this data has p_uncond = {p_uncond:g} (no label dropout: the null "
                "label is never trained); set --data.init_args.p_uncond 0.1 or "
                "model.objective.init_args.guidance 1"
            )

    def end_time(self, t: Tensor, path: GaussianConditionalPath, generator=None) -> Tensor:
        """The interval's other end ``r >= t`` (B,) for training times ``t`` (B,)."""
        t_other = path.sample_time(len(t), t.device, t.dtype, generator)
        keep = torch.rand(len(t), device=t.device, generator=generator) < 2 * self.interval_fraction
        return torch.where(keep & (t_other > t), t_other, t)

    def velocity(self, net, sample: PathSample, path, y: Tensor | None) -> Tensor:
        """The velocity the identity uses: the conditional one, or its guided mix (``guidance``)."""
        v = path.target(sample, "velocity")
        if self.guidance == 1.0 or y is None:
            return v
        null = net.num_classes
        with torch.no_grad():
            v_null = net(sample.x_t, sample.t, null_condition(y, null))
        guided = self.guidance * v + (1.0 - self.guidance) * v_null
        return torch.where(expand_like(~is_null(y, null), v), guided, v)

    def loss(
        self,
        net: nn.Module,
        sample: PathSample,
        path: GaussianConditionalPath,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r = self.end_time(sample.t, path, generator)
        v = self.velocity(net, sample, path, y)
        u, target = meanflow_target(lambda x, t, r: net(x, t, y, r=r), sample.x_t, sample.t, r, v)
        error = (u - target).square().flatten(1).mean(1)
        if self.power == 0:
            return error
        return error / (error.detach() + self.eps) ** self.power
