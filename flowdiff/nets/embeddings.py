"""Time and label embeddings shared by the networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """``t`` (B,) in [0, 1] -> (B, dim): sines and cosines at geometric frequencies, then an MLP."""

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding size must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # Times are scaled by 1000 so [0, 1] spans the frequencies a diffusion step index would.
        angles = 1000.0 * t.to(self.freqs.dtype)[:, None] * self.freqs[None]
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

    def __init__(self, dim: int):
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(dim)

    def forward(self, t: Tensor, r: Tensor | None) -> Tensor:
        return self.embed(torch.zeros_like(t) if r is None else r - t)
