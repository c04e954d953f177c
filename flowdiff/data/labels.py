"""Label and caption dropout for classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.utils import UsageError

NULL_CAPTION = ""  # the null caption (flowdiff.text.condition says how networks read it)


class LabelDropout:
    """Replace each label by the null label ``num_classes``, or each caption by the null caption
    ``""``, with probability ``p_uncond``.

    Applied per sample, to training batches only (the datamodules call it from
    ``on_after_batch_transfer`` while the trainer is training), so one network learns both the
    conditional field ``u(x|y)`` and the unconditional ``u(x|null)``.
    """

    def __init__(self, p_uncond: float, num_classes: int):
        if not 0.0 <= p_uncond <= 1.0:
            raise UsageError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.p_uncond, self.num_classes = p_uncond, num_classes

    def __call__(
        self, y: Tensor | list[str], generator: torch.Generator | None = None
    ) -> Tensor | list[str]:
        if self.p_uncond == 0.0:
            return y
        if not isinstance(y, Tensor):  # captions
            drop = torch.rand(len(y), generator=generator) < self.p_uncond
            return [
                NULL_CAPTION if d else caption for d, caption in zip(drop.tolist(), y, strict=True)
            ]
        drop = torch.rand(y.shape, device=y.device, generator=generator) < self.p_uncond
        return torch.where(drop, torch.full_like(y, self.num_classes), y)
