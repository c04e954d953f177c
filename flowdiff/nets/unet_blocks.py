"""The blocks of the U-Net (:mod:`flowdiff.nets.unet`): residual blocks that read the embedding,
self-attention over a feature map, and cross-attention from a feature map to text tokens.

Attention is :func:`flowdiff.nets.transformer.attend`, the DiT's: one attention in the project,
with an explicit boolean key mask (text padding masked, never zeroed by hand) and over the
positions of one sample, never across the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flowdiff.nets.transformer import CrossAttention, attend

NORMS = ("group", "batch")


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if kind == "group" else nn.BatchNorm2d(channels)


class ResBlock(nn.Module):
    """``h + conv(SiLU(norm(conv(SiLU(norm(h))) + W emb)))``: a pre-activation residual block.

    The embedding enters as a per-channel shift after the first convolution.

    Args:
        channels: channels C in and out.
        embed_dim: size E of the (time + label or pooled text) embedding.
        norm: ``"group"`` or ``"batch"``.
        norm_groups: groups of GroupNorm.
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, channels: int, embed_dim: int, norm: str, norm_groups: int, dropout: float):
        super().__init__()
        self.norm1 = make_norm(norm, channels, norm_groups)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.embed_proj = nn.Linear(embed_dim, channels)
        self.norm2 = make_norm(norm, channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def zero_init(self) -> list[nn.Module]:
        return [self.conv2]

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h: (B, C, H, W); emb: (B, E), already through SiLU. Returns (B, C, H, W)."""
        r = self.conv1(F.silu(self.norm1(h)))
        r = r + self.embed_proj(emb)[:, :, None, None]
        r = self.conv2(self.dropout(F.silu(self.norm2(r))))
        return h + r


class SelfAttention(nn.Module):
    """``h + W_o MultiHeadAttention(norm(h))`` over the H*W positions of a feature map.

    Args:
        channels: channels C, split into ``num_heads`` heads.
        num_heads: attention heads.
        norm: ``"group"`` or ``"batch"``.
        norm_groups: groups of GroupNorm.
    """

    def __init__(self, channels: int, num_heads: int, norm: str, norm_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = make_norm(norm, channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def zero_init(self) -> list[nn.Module]:
        return [self.out]

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, C, H, W). Returns (B, C, H, W)."""
        tokens = rearrange(self.norm(h), "b c h w -> b (h w) c")
        a = attend(*self.qkv(tokens).chunk(3, dim=-1), self.num_heads)
        return h + rearrange(self.out(a), "b (h w) c -> b c h w", h=h.shape[-2])


class TextAttention(nn.Module):
    """``h + W_o CrossAttention(norm(h), text)``: the H*W positions of a feature map attend to
    the text tokens (b, l, E) where ``mask`` (b, l) is True (Stable Diffusion's U-Net reads text
    this way, at the resolutions that have attention).

    Args:
        channels: channels C, split into ``num_heads`` heads.
        text_width: width E of the text tokens.
        num_heads: attention heads.
        norm: ``"group"`` or ``"batch"``.
        norm_groups: groups of GroupNorm.
    """

    def __init__(self, channels: int, text_width: int, num_heads: int, norm: str, norm_groups: int):
        super().__init__()
        self.norm = make_norm(norm, channels, norm_groups)
        self.attn = CrossAttention(channels, num_heads, text_width)

    def zero_init(self) -> list[nn.Module]:
        return [self.attn.out]

    def forward(self, h: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        """h: (B, C, H, W); text: (B, L, E); mask: (B, L). Returns (B, C, H, W)."""
        tokens = rearrange(self.norm(h), "b c h w -> b (h w) c")
        a = self.attn(tokens, text, mask)
        return h + rearrange(a, "b (h w) c -> b c h w", h=h.shape[-2])


class Stage(nn.Module):
    """``num_res_blocks`` residual blocks at one resolution, then optionally self-attention and
    (with ``text_width``) cross-attention to the text tokens."""

    def __init__(
        self,
        channels: int,
        embed_dim: int,
        num_res_blocks: int,
        attention: bool,
        num_heads: int,
        norm: str,
        norm_groups: int,
        dropout: float,
        text_width: int = 0,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(channels, embed_dim, norm, norm_groups, dropout) for _ in range(num_res_blocks)
        )
        self.attention = (
            SelfAttention(channels, num_heads, norm, norm_groups) if attention else None
        )
        self.cross = (
            TextAttention(channels, text_width, num_heads, norm, norm_groups)
            if attention and text_width
            else None
        )

    def forward(
        self, h: Tensor, emb: Tensor, text: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """h: (B, C, H, W); emb: (B, E); text (B, L, E'), mask (B, L) for a text stage.
        Returns (B, C, H, W)."""
        for block in self.blocks:
            h = block(h, emb)
        if self.attention is not None:
            h = self.attention(h)
        if self.cross is not None:
            h = self.cross(h, text, mask)
        return h
