"""A time-conditioned MLP for points, with an optional label embedding (null class for CFG)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdiff.config import Recorded
from flowdiff.nets.embeddings import LabelEmbedding, time_embeddings


class MLP(Recorded, nn.Module):
    """``forward(x, t, y=None, r=None) -> (B, dim)`` for points ``x`` (B, dim).

    The time (and label, and interval) embedding is added to the input projection; ``depth``
    hidden layers of width ``hidden`` with SiLU follow.

    Args:
        dim: data dimension.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        time_embed_dim: size of the sinusoidal time embedding.
        num_classes: number of labels; 0 for an unconditional network. With labels, index
            ``num_classes`` is the null label, for classifier-free guidance and when y is None.
            None: as many as the data has under the CLI (``flowdiff.nets.base``), 0 otherwise.
        interval: take a second time ``r`` (an embedding of ``r - t`` joins the time embedding):
            the network is an average velocity ``u(x, t, r)`` over [t, r] (MeanFlow); with
            ``r=None`` (or ``r = t``) it is the instantaneous velocity.
        time_scale: times are scaled by it before the sinusoids; None: 1000, or 1 with
            ``interval`` (:func:`flowdiff.nets.embeddings.time_embeddings` says why).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        time_embed_dim: int = 64,
        num_classes: int | None = None,
        interval: bool = False,
        time_scale: float | None = None,
    ):
        super().__init__()
        num_classes = num_classes or 0  # None: the data's under the CLI, none in plain Python
        self.dim, self.num_classes = dim, num_classes
        self.time_embed, self.interval_embed = time_embeddings(time_embed_dim, interval, time_scale)
        self.label_embed = LabelEmbedding(num_classes, time_embed_dim) if num_classes else None
        self.interval = interval
        self.input = nn.Linear(dim + time_embed_dim, hidden)
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Linear(hidden, dim))

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None
    ) -> Tensor:
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y, x.shape[0])
        if self.interval_embed is not None:
            emb = emb + self.interval_embed(t, r)
        return self.body(self.input(torch.cat([x, emb.to(x.dtype)], dim=-1)))
