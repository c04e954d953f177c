"""Time and label embeddings shared by the networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """``t`` (B,) in [0, 1] -> (B, dim): sines and cosines at geometric frequencies, then an MLP.

    Times are scaled by ``scale`` first: 1000 (the default) makes [0, 1] span the frequencies a
    diffusion step index would.
    """

    def __init__(self, dim: int, max_period: float = 10_000.0, scale: float = 1000.0):
        super().__init__()
        self.scale = scale
        if dim % 2:
            raise ValueError(f"time embedding size must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        angles = self.scale * t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(t.dtype))


class LabelEmbedding(nn.Module):
    """Labels (B,) in ``[0, num_classes]`` -> (B, dim); index ``num_classes`` is the null label."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch_size: int) -> Tensor:
        if y is None:
            y = torch.full((batch_size,), self.num_classes, device=self.embedding.weight.device)
        return self.embedding(y)


class IntervalEmbedding(nn.Module):
    """The interval of an average-velocity network (MeanFlow): ``(t, r)`` -> (B, dim), an embedding
    of ``r - t`` (0 when ``r`` is None: the instantaneous velocity at t), added to the time
    embedding. Networks build one only when asked (``interval=True``), so networks without it
    keep their parameters and load their checkpoints as before."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(dim, scale=scale)

    def forward(self, t: Tensor, r: Tensor | None) -> Tensor:
        return self.embed(torch.zeros_like(t) if r is None else r - t)


def time_embeddings(
    dim: int, interval: bool, time_scale: float | None = None
) -> tuple[SinusoidalTimeEmbedding, IntervalEmbedding | None]:
    """The time embedding of a network and, with ``interval``, its interval embedding.

    ``time_scale`` None: 1000 for a velocity network, 1 for an interval network. MeanFlow's target
    holds ``d_t u``: at a scale of 1000 the embedding's fastest features turn 1000 radians a unit of
    time, ``d_t u`` grows with them and the target feeds on itself (on 2D data the loss went from 4
    to 2e6 in 400 steps); at 1, as SiT's and MeanFlow's embeddings of t in [0, 1], it trains.
    """
    scale = time_scale if time_scale is not None else (1.0 if interval else 1000.0)
    embed = SinusoidalTimeEmbedding(dim, scale=scale)
    return embed, IntervalEmbedding(dim, scale) if interval else None
