"""A time- and label- (or text-) conditioned U-Net for images, with a null condition for CFG.

Layout for ``channels=(32, 64, 128)`` on a 28x28 image (the course's MNIST U-Net)::

    input conv 3x3 -> 32 @ 28x28
    encoder   level 0: ResBlock(32) x n  ─────────────────────────── skip ──┐
              down: conv 3x3 stride 2 -> 64 @ 14x14                          │
              level 1: ResBlock(64) x n  ───────────────── skip ──┐          │
              down: conv 3x3 stride 2 -> 128 @ 7x7                │          │
    midcoder  level 2: ResBlock(128) x n                          │          │
    decoder   up: conv 3x3 -> 64, nearest x2 -> 14x14, + skip  <──┘          │
              level 1: ResBlock(64) x n                                      │
              up: conv 3x3 -> 32, nearest x2 -> 28x28, + skip  <─────────────┘
              level 0: ResBlock(32) x n
    output    norm, SiLU, conv 3x3 -> in_channels

Skips are added, not concatenated, and the up-sampling conv runs at the coarse resolution: every
3x3 convolution then costs about the same (channels double as pixels quarter), and the network
stays cheap per image. Strided down-sampling rounds up (``ceil(H / 2)``) and up-sampling resizes to
the skip's exact size, so any H, W work, odd ones included.

A text-conditioned U-Net (``text_dim`` > 0) adds the pooled text to the time embedding, as the
label embedding is added, and ends every attention stage with cross-attention to the text tokens
(:class:`flowdiff.nets.unet_blocks.TextAttention`; the blocks live in
:mod:`flowdiff.nets.unet_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiff.config import Recorded
from flowdiff.nets.embeddings import LabelEmbedding, time_embeddings
from flowdiff.nets.text import TextEmbedder
from flowdiff.nets.unet_blocks import (
    NORMS,
    ResBlock,
    SelfAttention,
    Stage,
    TextAttention,
    make_norm,
)
from flowdiff.utils import UsageError

ZERO_INIT_BLOCKS = (ResBlock, SelfAttention, TextAttention)  # each lists its zero_init() layers


class UNet(Recorded, nn.Module):
    """``forward(x, t, y=None) -> (B, C, H, W)`` for images ``x`` (B, C, H, W).

    A sinusoidal time embedding plus a label embedding (null class for CFG) is injected into every
    residual block. ``channels[i]`` is the width at level ``i``; the resolution halves between
    levels: levels ``0 .. L-2`` form the encoder and the decoder (joined by additive skips) and
    level ``L-1`` the midcoder (see the module docstring). Any H, W work.

    With ``zero_init`` the second convolution of every residual block, the output projection of
    every attention block (self- and cross-) and the output convolution start at zero: each block
    starts as the identity and the network's output starts at 0.

    Args:
        in_channels: image channels C.
        channels: width of each resolution level, finest first.
        num_res_blocks: residual blocks per stage (encoder level, midcoder, decoder level).
        time_embed_dim: size of the time (and label) embedding.
        num_classes: number of labels; 0 for an unconditional network. With labels, index
            ``num_classes`` is the null label, for classifier-free guidance and when y is None.
            None: as many as the data has under the CLI (``flowdiff.nets.base``), 0 otherwise.
        attention_levels: indices of the levels whose stages end with a self-attention block.
        num_heads: heads of each self-attention block.
        norm: ``"group"`` (GroupNorm) or ``"batch"`` (BatchNorm, as in the course notebooks).
        norm_groups: groups of GroupNorm; must divide every entry of ``channels``.
        dropout: dropout probability inside the residual blocks.
        zero_init: start the residual branches and the output at zero.
        interval: take a second time ``r``: an average velocity ``u(x, t, r)`` (see ``MLP``).
        time_scale: the time embedding's scale (None: 1000, or 1 with ``interval``).
        text_dim: width of the text encoder's embeddings (0: the network reads no text). Set
            from the text encoder under the CLI. ``y`` is then a
            :class:`flowdiff.text.TextCondition` (None or an empty caption: the null caption,
            a learned null embedding, :class:`flowdiff.nets.text.TextEmbedder`). The pooled text
            joins the time embedding; the tokens are read by cross-attention at the
            ``attention_levels`` (none: the pooled text alone).
    """

    # Convolutions on a CPU run ~20% faster on NHWC than on NCHW tensors (the Network contract).
    memory_format = torch.channels_last

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int = 2,
        time_embed_dim: int = 128,
        num_classes: int | None = None,
        attention_levels: Sequence[int] = (),
        num_heads: int = 4,
        norm: Literal["group", "batch"] = "group",
        norm_groups: int = 8,
        dropout: float = 0.0,
        zero_init: bool = True,
        interval: bool = False,
        time_scale: float | None = None,
        text_dim: int = 0,
    ):
        super().__init__()
        num_classes = num_classes or 0  # None: the data's under the CLI, none in plain Python
        channels, attention_levels = list(channels), sorted(set(attention_levels))
        _check_config(
            in_channels,
            channels,
            num_res_blocks,
            time_embed_dim,
            num_classes,
            attention_levels,
            num_heads,
            norm,
            norm_groups,
            dropout,
        )
        if text_dim < 0 or (text_dim and num_classes):
            raise UsageError(
                f"text_dim must be >= 0 (0: no text) and a network conditions on labels or on "
                f"text, not both; got num_classes {num_classes}, text_dim {text_dim}"
            )
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.text_dim = text_dim
        levels = len(channels)

        self.time_embed, self.interval_embed = time_embeddings(time_embed_dim, interval, time_scale)
        self.label_embed = LabelEmbedding(num_classes, time_embed_dim) if num_classes else None
        reads_tokens = bool(attention_levels)
        self.text_embed = TextEmbedder(text_dim, time_embed_dim, reads_tokens) if text_dim else None
        text_width = time_embed_dim if text_dim and reads_tokens else 0
        self.interval = interval

        def stage(level: int) -> Stage:
            return Stage(
                channels[level],
                time_embed_dim,
                num_res_blocks,
                level in attention_levels,
                num_heads,
                norm,
                norm_groups,
                dropout,
                text_width,
            )

        self.input = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.encoder = nn.ModuleList(stage(i) for i in range(levels - 1))
        self.down = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1)
            for i in range(levels - 1)
        )
        self.midcoder = stage(levels - 1)
        # Decoder modules are stored coarsest first, in the order they run.
        self.up = nn.ModuleList(
            nn.Conv2d(channels[i + 1], channels[i], 3, padding=1)
            for i in reversed(range(levels - 1))
        )
        self.decoder = nn.ModuleList(stage(i) for i in reversed(range(levels - 1)))
        self.output = nn.Sequential(
            make_norm(norm, channels[0], norm_groups),
            nn.SiLU(),
            nn.Conv2d(channels[0], in_channels, 3, padding=1),
        )
        if zero_init:
            blocks = [m for m in self.modules() if isinstance(m, ZERO_INIT_BLOCKS)]
            for layer in [*(z for m in blocks for z in m.zero_init()), self.output[-1]]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y=None, r: Tensor | None = None):
        """x: (B, C, H, W); t: (B,) in [0, 1]; y: (B,) labels in [0, num_classes], a
        :class:`flowdiff.text.TextCondition` for a text network, or None (null); r: (B,) the
        interval's other end (``interval=True``).

        Returns (B, C, H, W).
        """
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y, x.shape[0])
        text = mask = None
        if self.text_embed is not None:
            text, mask, pooled = self.text_embed(y, x.shape[0])
            emb = emb + pooled
        if self.interval_embed is not None:
            emb = emb + self.interval_embed(t, r)
        # Every block's projection starts with a SiLU: apply it once here.
        emb = F.silu(emb)

        h = self.input(x)
        skips = []
        for stage, down in zip(self.encoder, self.down, strict=True):
            h = stage(h, emb, text, mask)
            skips.append(h)
            h = down(h)
        h = self.midcoder(h, emb, text, mask)
        for up, stage in zip(self.up, self.decoder, strict=True):
            skip = skips.pop()
            h = F.interpolate(up(h), size=skip.shape[-2:], mode="nearest") + skip
            h = stage(h, emb, text, mask)
        return self.output(h)


def _check_config(
    in_channels: int,
    channels: list[int],
    num_res_blocks: int,
    time_embed_dim: int,
    num_classes: int,
    attention_levels: list[int],
    num_heads: int,
    norm: str,
    norm_groups: int,
    dropout: float,
) -> None:
    """Raise ValueError naming the first bad UNet argument."""
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if time_embed_dim < 2 or time_embed_dim % 2:
        raise ValueError(f"time_embed_dim must be a positive even int, got {time_embed_dim}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {list(NORMS)}")
    if norm == "group" and (norm_groups < 1 or any(c % norm_groups for c in channels)):
        raise ValueError(
            f"norm_groups={norm_groups} must divide every entry of channels {channels}"
        )
    bad = [i for i in attention_levels if not 0 <= i < len(channels)]
    if bad:
        raise ValueError(
            f"attention_levels {bad} out of range; expected indices in [0, {len(channels) - 1}]"
        )
    if num_heads < 1 or any(channels[i] % num_heads for i in attention_levels):
        raise ValueError(
            f"num_heads={num_heads} must divide the channels of every attention level "
            f"{[channels[i] for i in attention_levels]}"
        )
