"""Fields: what samplers integrate. ``velocity(x, t)``, ``score(x, t)`` and both at once.

``ModelField`` turns a trained network into a field through the path's conversions, with
classifier-free guidance; ``GaussianMixtureField`` is the exact field of a Gaussian-mixture target
(MATH.md, "Closed forms for tests"). Samplers see only this interface: no labels, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

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


def guide(out_null: Tensor, out_cond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance: ``(1 - w) out(x|null) + w out(x|y)``."""
    return out_null + guidance * (out_cond - out_null)


class ModelField(Field):
    """A network ``net(x, t, y)`` viewed as a velocity and a score.

    Args:
        net: network with ``forward(x, t, y=None) -> tensor shaped like x``.
        path: the path it was trained on; converts its prediction to velocity and score.
        prediction: what the network outputs (``velocity``, ``score`` or ``noise``).
        y: labels (B,) to condition on, or None for an unconditional field.
        guidance: CFG scale ``w``; with labels, the null and conditional branches are evaluated in
            one batched forward pass of size 2B, combined as ``(1 - w) out(x|null) + w out(x|y)``.
            ``None`` (or 1 with labels) evaluates the conditional branch only, 0 the null branch.
        null_label: index of the null class (the network's ``num_classes``).
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianConditionalPath,
        prediction: Prediction,
        y: Tensor | None = None,
        guidance: float | None = None,
        null_label: int | None = None,
    ):
        if guidance is not None and y is None:
            raise UsageError("guidance needs labels to condition on")
        if guidance is not None and guidance != 1.0 and null_label is None:
            raise UsageError("guidance needs a model trained with a null label")
        self.net, self.path, self.prediction = net, path, prediction
        self.y, self.guidance, self.null_label = y, guidance, null_label

    def output(self, x: Tensor, t: Tensor) -> Tensor:
        """The (guided) network prediction at ``(x, t)``."""
        t = as_time(t, x)
        if self.y is None or self.guidance is None or self.guidance == 1.0:
            return self.net(x, t, self.y)
        null = torch.full_like(self.y, self.null_label)
        if self.guidance == 0.0:  # the unconditional field alone: one forward of size B
            return self.net(x, t, null)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, self.y]))
        out_null, out_cond = out.chunk(2)
        return guide(out_null, out_cond, self.guidance)

    def velocity_and_score(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = as_time(t, x)
        return self.path.to_velocity_and_score(self.output(x, t), self.prediction, x, t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = as_time(t, x)
        out = self.output(x, t)
        if self.prediction == "velocity":
            return out
        return self.path.to_velocity_and_score(out, self.prediction, x, t)[0]


class GaussianMixtureField(Field):
    """Exact marginal velocity and score of ``p_data = sum_k pi_k N(mu_k, s_k^2 I)`` on ``path``.

    With ``v_k(t) = alpha_t^2 s_k^2 + beta_t^2`` and posterior weights
    ``w_k(x) = softmax_k[log pi_k + log N(x; alpha_t mu_k, v_k I)]``::

        grad log p_t(x) = -sum_k w_k (x - alpha_t mu_k) / v_k
        u_t(x) = sum_k w_k [d_alpha_t mu_k + (alpha_t d_alpha_t s_k^2 + beta_t d_beta_t) / v_k
                            (x - alpha_t mu_k)]

    Args:
        weights: (K,) mixture weights; means: (K, *D); stds: (K,) isotropic standard deviations.
    """

    def __init__(
        self,
        path: GaussianConditionalPath,
        weights: Tensor | Sequence[float],
        means: Tensor,
        stds: Tensor | Sequence[float],
    ):
        self.path = path
        self.means = torch.as_tensor(means)
        self.weights = torch.as_tensor(weights, dtype=self.means.dtype)
        self.stds = torch.as_tensor(stds, dtype=self.means.dtype)

    def _terms(self, x: Tensor, t: Tensor):
        t = as_time(t, x)
        c = self.path.schedule(t)  # (B,)
        mu = self.means.to(x)  # (K, *D)
        d = mu[0].numel()
        diff = x.unsqueeze(1) - expand_like(c.alpha_t, x).unsqueeze(1) * mu  # (B, K, *D)
        v = c.alpha_t[:, None] ** 2 * self.stds.to(x) ** 2 + c.beta_t[:, None] ** 2  # (B, K)
        log_n = -0.5 * diff.flatten(2).square().sum(-1) / v - 0.5 * d * torch.log(2 * math.pi * v)
        log_joint = torch.log(self.weights.to(x)) + log_n  # (B, K)
        return c, mu, diff, v, log_joint

    def log_prob(self, x: Tensor, t: float | Tensor = 1.0) -> Tensor:
        """``log p_t(x)`` of the marginal mixture. Returns (B,)."""
        return torch.logsumexp(self._terms(x, t)[-1], dim=1)

    def velocity_and_score(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        c, mu, diff, v, log_joint = self._terms(x, t)
        w = torch.softmax(log_joint, dim=1)  # (B, K)
        shape = (*w.shape, *([1] * (x.ndim - 1)))
        score = -(w.reshape(shape) * diff / v.reshape(shape)).sum(1)
        beta_d_beta = self.path.schedule.beta_d_beta(as_time(t, x))  # finite at t = 1
        gain = (
            c.alpha_t[:, None] * c.d_alpha_t[:, None] * self.stds.to(x) ** 2 + beta_d_beta[:, None]
        ) / v  # (B, K)
        drift = expand_like(c.d_alpha_t, x).unsqueeze(1) * mu + gain.reshape(shape) * diff
        return (w.reshape(shape) * drift).sum(1), score

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws from the mixture and their component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=self.means.dtype)
        return self.means[k] + expand_like(self.stds[k], noise) * noise, k

    def component(self, k: int) -> GaussianMixtureField:
        """The exact field of component ``k`` alone (the conditional field ``u(x|y=k)``)."""
        return GaussianMixtureField(self.path, [1.0], self.means[k : k + 1], self.stds[k : k + 1])
