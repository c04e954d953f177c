"""Transformer blocks of the DiT: adaLN-Zero self-attention (DiT), with cross-attention to text
tokens (PixArt-alpha), or joint attention over an image and a text stream (MM-DiT, SD3).

One attention function on ``F.scaled_dot_product_attention`` with an explicit boolean key mask:
padding tokens are masked, never zeroed by hand, so they never change an output. Attention runs
over the tokens of one sample, never across the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``h * (1 + scale) + shift`` per sample: h (b, n, d); shift, scale (b, d)."""
    return h * (1 + scale[:, None]) + shift[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention of q (b, n, d) over k, v (b, m, d); ``mask`` (b, m) bool: the keys
    each sample may attend to (None: all). Returns (b, n, d)."""
    q, k, v = (rearrange(a, "b n (heads d) -> b heads n d", heads=num_heads) for a in (q, k, v))
    a = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None, None]
    )
    return rearrange(a, "b heads n d -> b n (heads d)")


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of each sample: h (b, n, d) -> (b, n, d)."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(attend(*self.qkv(h).chunk(3, dim=-1), self.num_heads))


class CrossAttention(nn.Module):
    """Image tokens h (b, n, d) attend to text tokens (b, l, e) where ``mask`` (b, l) is True;
    ``text_width`` e is d unless given (a U-Net's levels differ in width, its text does not)."""

    def __init__(self, hidden: int, num_heads: int, text_width: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(text_width or hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        return self.out(attend(self.q(h), *self.kv(text).chunk(2, dim=-1), self.num_heads, mask))


def mlp(hidden: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden)
    )


def layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """``h += g1 * Attn(mod(LN(h), b1, s1))``; with ``cross``: ``h += CrossAttn(LN(h), text)``
    (PixArt-alpha: the text is read without modulation); ``h += g2 * MLP(mod(LN(h), b2, s2))``.

    ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))``, zero at initialisation (adaLN-Zero), and the
    cross-attention's output projection starts at zero too: every block starts as the identity.

    Args:
        hidden: token width d.
        num_heads: attention heads; they divide d.
        mlp_hidden: width of the MLP's hidden layer.
        cross: whether the block reads text tokens by cross-attention.
    """

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, cross: bool = False):
        super().__init__()
        self.norm1 = layer_norm(hidden)
        self.attn = Attention(hidden, num_heads)
        self.cross = CrossAttention(hidden, num_heads) if cross else None
        self.norm_cross = nn.LayerNorm(hidden, eps=1e-6) if cross else None
        self.norm2 = layer_norm(hidden)
        self.mlp = mlp(hidden, mlp_hidden)
        self.adaln = nn.Linear(hidden, 6 * hidden)

    def zero_init(self) -> list[nn.Linear]:
        """The layers adaLN-Zero starts at zero."""
        return [self.adaln] + ([self.cross.out] if self.cross is not None else [])

    def forward(
        self, h: Tensor, c: Tensor, text: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """h: (b, n, d); c: (b, d), already through SiLU; text (b, l, d), mask (b, l) for a
        cross-attention block. Returns (h, text)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=1)
        h = h + gate1[:, None] * self.attn(modulate(self.norm1(h), shift1, scale1))
        if self.cross is not None:
            h = h + self.cross(self.norm_cross(h), text, mask)
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2)), text


class JointBlock(nn.Module):
    """MM-DiT (SD3): an image stream and a text stream, each with its own adaLN-Zero modulation,
    attention projections and MLP, joined only inside one attention over both streams' tokens
    (text padding masked). ``last``: the text stream's output is not used after this block, so
    it only gives keys and values (SD3's ``context_pre_only``)."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, last: bool = False):
        super().__init__()
        self.num_heads, self.last = num_heads, last
        self.image = _Stream(hidden, mlp_hidden, pre_only=False)
        self.text = _Stream(hidden, mlp_hidden, pre_only=last)

    def zero_init(self) -> list[nn.Linear]:
        return [self.image.adaln, self.text.adaln]

    def forward(self, h: Tensor, c: Tensor, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """h: (b, n, d); c: (b, d) after SiLU; text (b, l, d); mask (b, l). Returns (h, text)."""
        qkv_h, mod_h = self.image.before(h, c)
        qkv_t, mod_t = self.text.before(text, c)
        q, k, v = (torch.cat([a, b], dim=1) for a, b in zip(qkv_t, qkv_h, strict=True))
        keys = torch.cat([mask, mask.new_ones(h.shape[:2])], dim=1)
        a = attend(q, k, v, self.num_heads, keys)
        a_t, a_h = a[:, : text.shape[1]], a[:, text.shape[1] :]
        h = self.image.after(h, a_h, mod_h)
        return h, (text if self.last else self.text.after(text, a_t, mod_t))


class _Stream(nn.Module):
    """One stream of an MM-DiT block: adaLN, qkv before the joint attention; output projection
    and MLP, both gated, after it (not with ``pre_only``)."""

    def __init__(self, hidden: int, mlp_hidden: int, pre_only: bool):
        super().__init__()
        self.norm1 = layer_norm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.adaln = nn.Linear(hidden, (2 if pre_only else 6) * hidden)
        if not pre_only:
            self.out = nn.Linear(hidden, hidden)
            self.norm2 = layer_norm(hidden)
            self.mlp = mlp(hidden, mlp_hidden)

    def before(self, h: Tensor, c: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        mod = self.adaln(c).chunk(self.adaln.out_features // c.shape[1], dim=1)
        return self.qkv(modulate(self.norm1(h), mod[0], mod[1])).chunk(3, dim=-1), mod

    def after(self, h: Tensor, a: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        h = h + gate1[:, None] * self.out(a)
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))
