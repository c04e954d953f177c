"""Training callbacks."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from flowdiff.utils import UsageError


def ema_decay(decay: float, warmup: float, num_averaged: int) -> float:
    """EMA decay after ``n = num_averaged`` updates: ``min(decay, (1 + n) / (warmup + n))``.

    The warm-up keeps the average from holding on to the first, nearly random, weights: with a
    fixed decay of 0.999, 1,100 updates still weigh the first iterate by ``0.999^1100 = 1/3``;
    with the warm-up the weight of early iterates falls like ``1/n^(warmup - 1)``.
    """
    return min(decay, (1.0 + num_averaged) / (warmup + num_averaged))


class EMA(WeightAveraging):
    """Exponential moving average of the weights, on Lightning's ``WeightAveraging``.

    Validation, checkpoints (``state_dict``) and the model after ``fit`` hold the averaged weights;
    the raw weights are kept in the checkpoint under ``current_model_state`` so training resumes
    exactly. The update is one fused ``lerp`` over all parameters.

    Args:
        decay: the EMA decay once warmed up.
        warmup: the decay after n updates is ``min(decay, (1 + n) / (warmup + n))``; 0 disables it.
        update_every_n_steps: update the average every n optimizer steps.
    """

    def __init__(self, decay: float = 0.999, warmup: float = 10.0, update_every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise UsageError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise UsageError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps

        @torch.no_grad()
        def multi_avg_fn(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
            n = int(num_averaged)
            d = ema_decay(decay, warmup, n) if warmup > 0 else decay
            torch._foreach_lerp_(ema, current, 1.0 - d)

        super().__init__(use_buffers=False, multi_avg_fn=multi_avg_fn)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0
