"""How a network reads a text condition (:class:`flowdiff.text.TextCondition`): its pooled vector
joins the time embedding (adaLN), its tokens are projected to the network's width for cross- or
joint attention, and the null caption becomes learned null embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

TEXT_MODES = ("pooled", "cross", "joint")


class TextEmbedder(nn.Module):
    """Text condition -> ``(tokens (b, 1 + l, width), mask (b, 1 + l), pooled (b, width))``.

    A learned null token leads every sample's tokens and is always attended to: the null caption
    (no token) reads it alone, so attention is never over an empty set, and a caption reads it
    beside its words. The null caption's pooled vector is a learned null vector. ``y=None`` is
    the null caption for the whole batch.

    Args:
        text_dim: width of the encoder's token and pooled embeddings.
        width: the network's embedding width.
        tokens: whether the network reads tokens (False: the pooled vector only).
    """

    def __init__(self, text_dim: int, width: int, tokens: bool = True):
        super().__init__()
        self.pooled = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.null_pooled = nn.Parameter(0.02 * torch.randn(width))
        self.tokens = nn.Linear(text_dim, width) if tokens else None
        self.null_token = nn.Parameter(0.02 * torch.randn(1, width)) if tokens else None

    def forward(self, y, batch_size: int) -> tuple[Tensor | None, Tensor | None, Tensor]:
        width = self.null_pooled.shape[0]
        if y is None:
            pooled = self.null_pooled.expand(batch_size, width)
            if self.tokens is None:
                return None, None, pooled
            tokens = self.null_token.expand(batch_size, 1, width)
            return tokens, torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device), pooled
        null = y.is_null[:, None]
        pooled = torch.where(null, self.null_pooled.to(y.pooled.dtype), self.pooled(y.pooled))
        if self.tokens is None:
            return None, None, pooled
        tokens = self.tokens(y.tokens)
        lead = self.null_token.to(tokens.dtype).expand(tokens.shape[0], 1, width)
        mask = torch.cat([y.mask.new_ones(y.mask.shape[0], 1), y.mask], dim=1)
        return torch.cat([lead, tokens], dim=1), mask, pooled
