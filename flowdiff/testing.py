"""Exact answers for tests (MATH.md, "Closed forms for tests"): not used by flowdiff itself."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from flowdiff.fields import Field
from flowdiff.paths import GaussianConditionalPath
from flowdiff.utils import as_time, expand_like


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


def random_text_condition(b: int, length: int, width: int, seed: int):
    """``b`` random encoded captions of 1..``length`` tokens of ``width`` (padding zero and
    masked), for tests of networks that read text."""
    from flowdiff.text.condition import TextCondition

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    tokens = torch.randn(b, length, width, generator=g) * mask[..., None]
    return TextCondition(tokens, mask, torch.randn(b, width, generator=g))


def pad_with_garbage(y, extra: int = 7, seed: int = 0):
    """``y`` (a TextCondition) with ``extra`` more padding slots holding large random values,
    masked: a network that honours the mask gives the same output for both."""
    from flowdiff.text.condition import TextCondition

    b, _, width = y.tokens.shape
    garbage = torch.randn(b, extra, width, generator=torch.Generator().manual_seed(seed)) * 100
    mask = torch.cat([y.mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
    return TextCondition(torch.cat([y.tokens, garbage], 1), mask, y.pooled)
