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

    def check(self, net: nn.Module, path: GaussianConditionalPath) -> None:
        """Refuse a network or path this objective cannot train (a UsageError): a score or noise
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
