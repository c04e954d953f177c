"""The network contract (a Protocol: any ``nn.Module`` with this shape is a flowdiff network)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Network(Protocol):
    """``forward(x, t, y=None) -> tensor shaped like x``.

    - ``x`` (B, *D) is the state, ``t`` (B,) the time in [0, 1], ``y`` (B,) integer labels or None.
    - ``num_classes``: 0 for an unconditional network; otherwise labels are ``0..num_classes-1``
      and ``num_classes`` itself is the null label (label dropout, classifier-free guidance, and
      what ``y=None`` means).
    - Samples in a batch never interact (no batch statistics in training mode that mix them, no
      attention across the batch): the likelihood's divergence and the batched guidance (null and
      conditional branches in one forward of 2B) rely on it.
    - Networks know nothing of paths or objectives. Sizes that the data fixes reach them through
      ``link_arguments`` in the CLI (or the caller in Python).

    Subclass :class:`flowdiff.config.Recorded` too (``class Net(Recorded, nn.Module)``) for a
    model built in plain Python to write a self-describing checkpoint; under the CLI the config
    describes it already.
    """

    num_classes: int

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor: ...
