"""A diffusion transformer (DiT, Peebles & Xie 2023) for images, with adaLN-Zero conditioning.

Layout for ``patch_size=4`` on a 28x28 grey image::

    patchify  (B, 1, 28, 28) -> (B, 49, 16): 7x7 patches of 4x4 pixels, one token each
    embed     Linear(16 -> hidden) + positional embedding (fixed 2D sin-cos or learned)
    blocks    depth x DiTBlock(hidden): attention and MLP, each modulated by the condition c
    final     adaLN LayerNorm, Linear(hidden -> 16)
    unpatchify (B, 49, 16) -> (B, 1, 28, 28)

The condition ``c = time embedding + label embedding`` (null label for CFG) sets every block's
LayerNorm shift and scale and a gate on each residual branch. The gates and the final projection
start at zero (adaLN-Zero): every block starts as the identity and the output at 0.

A text-conditioned DiT (``text_dim`` > 0) adds the pooled text to c and reads the text tokens one
of three ways (``text_mode``): ``pooled`` (adaLN only), ``cross`` (PixArt-alpha: self-attention,
cross-attention to the tokens, MLP in each block) or ``joint`` (MM-DiT as in SD3: a text stream
with its own weights, one attention over both streams). See :mod:`flowdiff.nets.transformer`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flowdiff.config import Recorded
from flowdiff.nets.embeddings import LabelEmbedding, SinusoidalTimeEmbedding
from flowdiff.nets.text import TEXT_MODES, TextEmbedder
from flowdiff.nets.transformer import DiTBlock, JointBlock, modulate
from flowdiff.utils import UsageError

POS_EMBEDS = ("sincos", "learned")


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2D positional embedding (grid_h * grid_w, dim), tokens in row-major order.

    Token (i, j) gets ``[sin(i w), cos(i w), sin(j w), cos(j w)]`` with the ``dim / 4``
    frequencies ``w_k = 10000^(-k / (dim / 4))``: the first half encodes the row, the second the
    column.
    """
    quarter = dim // 4
    omega = 10_000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w).reshape(-1)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w).reshape(-1)
    a, b = rows[:, None] * omega[None], cols[:, None] * omega[None]
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).float()


class DiT(Recorded, nn.Module):
    """``forward(x, t, y=None) -> (B, C, H, W)`` for images ``x`` (B, C, H, W) of a fixed size.

    Patches of ``patch_size`` pixels become tokens of width ``hidden`` that ``depth`` transformer
    blocks process, conditioned by adaLN-Zero on the time embedding plus the label embedding (see
    the module docstring). The time and label embeddings have size ``hidden``.

    Args:
        in_channels: image channels C.
        image_size: H = W, or [H, W]; both multiples of ``patch_size``.
        patch_size: side of the square patches, in pixels.
        hidden: token width; ``num_heads`` divides it (and 4 divides it for ``sincos``).
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: width of each block's MLP, as a multiple of ``hidden``.
        num_classes: number of labels; 0 for an unconditional network. With labels, index
            ``num_classes`` is the null label, for classifier-free guidance and when y is None.
            None: as many as the data has under the CLI (``flowdiff.nets.base``), 0 otherwise.
        pos_embed: ``sincos`` (fixed 2D sines and cosines) or ``learned``.
        text_dim: width of the text encoder's embeddings (0: the network reads no text). Set
            from the text encoder under the CLI. ``y`` is then a
            :class:`flowdiff.text.TextCondition` (None or an empty caption: the null caption).
        text_mode: how text tokens enter: ``pooled``, ``cross`` or ``joint`` (module docstring).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | list[int] = 28,
        patch_size: int = 4,
        hidden: int = 192,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        text_dim: int = 0,
        text_mode: Literal["pooled", "cross", "joint"] = "cross",
    ):
        super().__init__()
        num_classes = num_classes or 0  # None: the data's under the CLI, none in plain Python
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        _check_config(
            in_channels, size, patch_size, hidden, depth, num_heads, mlp_ratio, num_classes,
            pos_embed,
        )  # fmt: skip
        _check_text(num_classes, text_dim, text_mode)
        self.in_channels, self.image_size, self.patch_size = in_channels, size, patch_size
        self.num_classes, self.text_dim, self.text_mode = num_classes, text_dim, text_mode
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        patch_dim = patch_size * patch_size * in_channels

        self.time_embed = SinusoidalTimeEmbedding(hidden)
        self.label_embed = LabelEmbedding(num_classes, hidden) if num_classes else None
        reads_tokens = text_mode != "pooled"
        self.text_embed = TextEmbedder(text_dim, hidden, reads_tokens) if text_dim else None
        self.patch_embed = nn.Linear(patch_dim, hidden)
        tokens = self.grid[0] * self.grid[1]
        if pos_embed == "sincos":
            # Computed from the config, so not saved in checkpoints.
            self.register_buffer("pos", sincos_2d(*self.grid, hidden), persistent=False)
        else:
            self.pos = nn.Parameter(0.02 * torch.randn(tokens, hidden))
        width = int(hidden * mlp_ratio)
        if text_dim and text_mode == "joint":
            self.blocks = nn.ModuleList(
                JointBlock(hidden, num_heads, width, last=i == depth - 1) for i in range(depth)
            )
        else:
            cross = bool(text_dim) and text_mode == "cross"
            self.blocks = nn.ModuleList(
                DiTBlock(hidden, num_heads, width, cross) for _ in range(depth)
            )
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Linear(hidden, 2 * hidden)
        self.output = nn.Linear(hidden, patch_dim)

        # DiT's initialisation: Xavier for the token path, zero for every modulation and the
        # output (adaLN-Zero).
        for module in [self.patch_embed, *self.blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        zero = [linear for block in self.blocks for linear in block.zero_init()]
        for linear in [*zero, self.final_adaln, self.output]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        # The condition's two terms at one scale, N(0, 0.02^2) as the paper: nn.Embedding's N(0, 1)
        # label table would swamp the time embedding in c (std ~1 against ~0.1).
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embedding.weight, std=0.02)
        for linear in self.time_embed.mlp:
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, t: Tensor, y=None) -> Tensor:
        """x: (B, C, H, W); t: (B,) in [0, 1]; y: (B,) labels in [0, num_classes], a
        :class:`flowdiff.text.TextCondition` for a text network, or None (null).

        Returns (B, C, H, W).
        """
        expected = [self.in_channels, *self.image_size]
        if list(x.shape[1:]) != expected:
            channels, *size = x.shape[1:]
            fix = [f"in_channels {channels}"] if channels != self.in_channels else []
            fix += [f"image_size {size}"] if size != self.image_size else []
            raise UsageError(
                f"the DiT was built for images of shape {expected} but got {list(x.shape[1:])}; "
                f"set model.net.init_args {' and '.join(fix)}"
            )
        c = self.time_embed(t)
        if self.label_embed is not None:
            c = c + self.label_embed(y, x.shape[0])
        text = mask = None
        if self.text_embed is not None:
            text, mask, pooled = self.text_embed(y, x.shape[0])
            c = c + pooled
        # Every modulation starts with a SiLU: apply it once here.
        c = F.silu(c)

        p = self.patch_size
        h = rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
        h = self.patch_embed(h) + self.pos
        for block in self.blocks:
            h, text = block(h, c, text, mask)
        shift, scale = self.final_adaln(c).chunk(2, dim=1)
        h = self.output(modulate(self.final_norm(h), shift, scale))
        return rearrange(
            h, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=self.grid[0], p1=p, p2=p
        )


def _check_text(num_classes: int, text_dim: int, text_mode: str) -> None:
    if text_dim < 0:
        raise UsageError(f"text_dim must be >= 0 (0: no text), got {text_dim}")
    if text_dim and num_classes:
        raise UsageError(
            f"a network conditions on labels or on text, not both (num_classes {num_classes}, "
            f"text_dim {text_dim})"
        )
    if text_mode not in TEXT_MODES:
        raise UsageError(f"unknown text_mode {text_mode!r}; expected one of {list(TEXT_MODES)}")


def _check_config(
    in_channels: int,
    size: list[int],
    patch_size: int,
    hidden: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    num_classes: int,
    pos_embed: str,
) -> None:
    """Raise UsageError naming the first bad DiT argument."""
    if in_channels < 1:
        raise UsageError(f"in_channels must be >= 1, got {in_channels}")
    if len(size) != 2 or any(s < 1 for s in size):
        raise UsageError(f"image_size must be a positive int or [H, W], got {size}")
    if patch_size < 1:
        raise UsageError(f"patch_size must be >= 1, got {patch_size}")
    bad = sorted({s for s in size if s % patch_size})
    if bad:
        fits = [p for p in range(1, min(size) + 1) if all(s % p == 0 for s in size)]
        raise UsageError(
            f"image size {' and '.join(map(str, bad))} is not a multiple of patch_size "
            f"{patch_size}; choose a patch_size in {fits}"
        )
    if depth < 1:
        raise UsageError(f"depth must be >= 1, got {depth}")
    if num_heads < 1 or hidden < 1 or hidden % num_heads:
        raise UsageError(f"num_heads={num_heads} must divide hidden={hidden}")
    if hidden % 2:
        raise UsageError(f"hidden must be even (the time embedding's size), got {hidden}")
    if pos_embed not in POS_EMBEDS:
        raise UsageError(f"unknown pos_embed {pos_embed!r}; expected one of {list(POS_EMBEDS)}")
    if pos_embed == "sincos" and hidden % 4:
        raise UsageError(f"hidden must be a multiple of 4 for pos_embed 'sincos', got {hidden}")
    if int(hidden * mlp_ratio) < 1:
        raise UsageError(f"mlp_ratio must make an MLP of width >= 1, got {mlp_ratio}")
    if num_classes < 0:
        raise UsageError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
