"""Training objectives: small callables ``objective(output, sample, path) -> per-sample loss``.

CFM and CSM regress the network output on a target built from the same path sample; they differ
only in what the network predicts (and so in the target). The loss is the mean over the data
dimensions, so its scale does not depend on the image size. :meth:`Objective.loss` is what the
module calls: one forward of the network and the callable; an objective that needs more of the
network than one output (MeanFlow's Jacobian-vector product, :mod:`flowdiff.meanflow`) overrides it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from flowdiff.config import Recorded
from flowdiff.paths import GaussianConditionalPath, PathSample, Prediction
from flowdiff.utils import UsageError


class Objective(Recorded):
    """Base class. ``prediction`` names what the network outputs: velocity, score or noise."""

    prediction: Prediction

    def __call__(self, output: Tensor, sample: PathSample, path: GaussianConditionalPath) -> Tensor:
        """Per-sample loss ``mean_D (output - target)^2``. output: (B, *D). Returns (B,)."""
        target = path.target(sample, self.prediction)
        return (output - target).square().flatten(1).mean(1)

    def check(self, net: nn.Module, path: GaussianConditionalPath, coupling=None) -> None:
        """Refuse a network, path or coupling (:mod:`flowdiff.couplings`, None: the
        independent one) this objective cannot train (a UsageError): a score or noise
        prediction becomes a velocity through 1 / alpha_t and a score through 1 / beta_t, so at
        t = 0 (alpha = 0) or t = 1 (beta = 0) it would divide by 0."""
        if self.prediction == "velocity":
            return
        if path.t_min <= 0:
            raise UsageError(
                f"model.path.init_args.t_min must be > 0 for a {self.prediction} prediction (it "
                f"is turned into a velocity through 1 / alpha_t, and alpha_0 = 0), got "
                f"t_min={path.t_min}; try 0.01"
            )
        if path.t_max >= 1:
            raise UsageError(
                f"model.path.init_args.t_max must be < 1 for a {self.prediction} prediction "
                f"(beta_1 = 0), got t_max={path.t_max}; try 0.999"
            )

    def check_data(self, datamodule) -> None:
        """Refuse data this objective cannot train on (a UsageError), before training starts;
        ``datamodule`` states the data contract (:mod:`flowdiff.data.base`). None here."""

    def loss(
        self,
        net: nn.Module,
        sample: PathSample,
        path: GaussianConditionalPath,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The per-sample loss (B,) of ``net`` at ``sample`` (labels ``y``, or None)."""
        return self(net(sample.x_t, sample.t, y), sample, path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction={self.prediction!r})"


class ConditionalFlowMatching(Objective):
    """CFM: ``E || u_theta(x_t, t) - u_t(x_t|z) ||^2``, ``u_t(x|z) = d_alpha_t z + d_beta_t eps``.

    Theorem 3 of the course notes: it differs from the marginal flow-matching loss by a constant.
    """

    prediction: Prediction = "velocity"


class ConditionalScoreMatching(Objective):
    """CSM: ``E lambda_t || s_theta(x_t, t) - grad log p_t(x_t|z) ||^2``, target ``-eps / beta_t``.

    Args:
        weighting: ``"beta2"`` (default) uses ``lambda_t = beta_t^2``, i.e.
            ``E || beta_t s_theta + eps ||^2``. The network then predicts the noise
            ``eps_theta = -beta_t s_theta`` (DDPM's parameterisation), so its output stays O(1) for
            all t, and the score is recovered as ``-eps_theta / beta_t``. ``"none"`` uses
            ``lambda_t = 1``: the network predicts the score itself, whose target grows like
            ``1 / beta_t`` near t = 1 and dominates the loss there: why it is not the default.
    """

    def __init__(self, weighting: Literal["beta2", "none"] = "beta2"):
        if weighting not in ("beta2", "none"):
            raise UsageError(f"unknown weighting {weighting!r}; expected 'beta2' or 'none'")
        self.weighting = weighting
        self.prediction = "noise" if weighting == "beta2" else "score"

    def __repr__(self) -> str:
        return f"ConditionalScoreMatching(weighting={self.weighting!r})"


class StableTargetFlowMatching(ConditionalFlowMatching):
    """CFM on the stable target field (Xu et al. 2023, "Stable Target Field for Reduced Variance
    Score Estimation in Diffusion Models"): a lower-variance target for the same field.

    The marginal field is ``u_t(x) = E[u_t(x|z) | x_t = x]``. CFM regresses on one draw of
    ``u_t(x|z)``, the one whose ``z`` made ``x_t``; far from the data end that draw is mostly noise.
    STF averages it over a reference set of data points ``z_j`` (the batch and the ``reference``
    data points of the batches before it, kept in a first-in first-out bank) with the posterior
    weights of the independent coupling,
    ``w_ij = softmax_j(-||x_t^i - alpha_t z_j||^2 / (2 beta_t^2))``, and regresses on
    ``d_alpha_t z_hat + d_beta_t eps_hat`` with ``z_hat = sum_j w_ij z_j`` and
    ``eps_hat = (x_t - alpha_t z_hat) / beta_t``. The own data point is in the reference set, so as
    ``t -> 1`` the weights fall on it and the target becomes CFM's; with an unbounded reference
    set the target is the marginal field itself. For a finite set it is biased, by O(1 / n)
    (Xu et al.); its variance is what falls.

    With labels, a sample's reference set is the points of its own label (a sample with the null
    label of guidance uses every point). The bank is per process (under DDP, per rank), is filled
    by training batches only (never validation), and is not in the checkpoint: a resumed run
    refills it within ``reference / batch_size`` steps. It needs the independent coupling (the
    weights are its posterior); :meth:`check` refuses any other.

    Cost: a (B, B + reference) matrix product over the flattened samples a step, in float32
    (float64 for float64 data) whatever the autocast: near t = 1 the shift ``z_hat - z`` is
    multiplied by ``alpha_t / beta_t`` (999 at t = 0.999), so ``z_hat`` rounded to bfloat16 would
    become an O(1) error of the target.

    Args:
        reference: data points of earlier batches joined to the batch in the reference set; 0
            uses the batch alone.
    """

    def __init__(self, reference: int = 2048):
        if reference < 0:
            raise UsageError(f"stable target needs reference >= 0, got reference={reference}")
        self.reference = int(reference)
        self._bank: tuple[Tensor, Tensor | None] | None = None

    def check(self, net, path, coupling=None) -> None:
        super().check(net, path, coupling)
        if getattr(net, "text_dim", 0):
            raise UsageError(
                f"{self!r} draws a sample's reference set from the points of its own label, and "
                "this network reads captions; pass --model.objective "
                "flowdiff.objectives.ConditionalFlowMatching"
            )
        if coupling is not None and coupling.name != "independent":
            raise UsageError(
                f"model.coupling {coupling.name} needs another objective: {self!r} weighs the "
                f"data by the posterior of the independent coupling; pass "
                f"--model.objective flowdiff.objectives.ConditionalFlowMatching"
            )

    def loss(self, net, sample, path, y=None, generator=None) -> Tensor:
        null = getattr(net, "num_classes", None) if y is not None else None
        stable = self.stable_sample(sample, path, y, null, update=net.training)
        return self(net(sample.x_t, sample.t, y), stable, path)

    @torch.no_grad()
    def stable_sample(
        self,
        sample: PathSample,
        path: GaussianConditionalPath,
        y: Tensor | None = None,
        null: int | None = None,
        update: bool = True,
    ) -> PathSample:
        """``sample`` with ``z`` and ``eps`` replaced by their posterior means ``z_hat`` and
        ``eps_hat`` over the reference set; ``update``: push the batch into the bank after."""
        z, c = sample.z, sample.coefficients or path.coefficients(sample.t, sample.z)
        ref_z, ref_y = z, y
        bank = self._bank  # unused when the data's shape or labelling changed
        if (
            bank is not None
            and bank[0].shape[1:] == z.shape[1:]
            and (bank[1] is None) == (y is None)
        ):
            ref_z = torch.cat([z, bank[0].to(z)])
            ref_y = None if y is None else torch.cat([y, bank[1].to(y)])
        with torch.autocast(z.device.type, enabled=False):  # float32 at least: see Cost
            shift = self._shift(sample.x_t, z, c, ref_z, y, ref_y, null)
        if update and self.reference:
            self._bank = (
                ref_z[: self.reference].detach(),
                None if ref_y is None else ref_y[: self.reference].detach(),
            )
        return PathSample(
            x_t=sample.x_t,
            z=z + shift,
            eps=sample.eps - c.alpha_t / c.beta_t.clamp_min(1e-15) * shift,
            t=sample.t,
            coefficients=c,
        )

    @staticmethod
    def _shift(x_t, z, c, ref_z, y, ref_y, null) -> Tensor:
        """``z_hat - z`` (B, *D): the posterior mean of the data point over the reference set
        ``ref_z`` (N, *D) (labels ``ref_y``) given ``x_t`` (B, *D), less the sample's own ``z``."""
        b, dtype = len(z), torch.promote_types(z.dtype, torch.float32)  # float32 at least
        alpha = c.alpha_t.reshape(b, -1)[:, :1].to(dtype)
        beta2 = c.beta_t.reshape(b, -1)[:, :1].to(dtype).square().clamp_min(1e-30)
        x, r = x_t.flatten(1).to(dtype), ref_z.flatten(1).to(dtype)
        # A non-finite data point (a batch the non-finite guard skips) weighs nothing, here and
        # while it stays in the bank; checked on the device, without a host read.
        finite = torch.isfinite(r).all(1)
        r = torch.where(finite[:, None], r, torch.zeros_like(r))
        # -||x - alpha z_j||^2 / (2 beta^2) up to a term of x alone, which the softmax drops
        logits = (alpha * (x @ r.T) - alpha.square() / 2 * r.square().sum(1)) / beta2
        logits = logits.masked_fill(~finite[None, :], -torch.inf)
        if y is not None:
            allowed = ref_y[None, :] == y[:, None]
            if null is not None:
                allowed |= (y == null)[:, None]
            logits = logits.masked_fill(~allowed, -torch.inf)
        z_hat = torch.softmax(logits, dim=1) @ r
        return (z_hat - z.flatten(1).to(dtype)).reshape(z.shape)  # not rounded back to z's

    def __repr__(self) -> str:
        return f"StableTargetFlowMatching(reference={self.reference})"
