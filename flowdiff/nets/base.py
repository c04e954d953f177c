"""The network contract (a Protocol: any ``nn.Module`` with this shape is a flowdiff network)."""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from flowdiff.config import import_class


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
    - Networks know nothing of paths or objectives. Sizes that the data fixes reach them from the
      datamodule (:func:`size_from_data`, which the CLI applies before building the network): a
      constructor argument named ``in_channels``, ``image_size`` or ``dim`` is always set from
      the data, and ``num_classes`` when the config leaves it ``None`` (write ``0`` for an
      unconditional network on labelled data). In plain Python the caller passes them.

    - Optionally, an average-velocity network (MeanFlow, ``flowdiff.objectives.MeanFlow``) sets
      ``interval = True`` and takes a second time: ``forward(x, t, y=None, r=None)`` is the
      average velocity ``u(x, t, r) = (x_r - x_t) / (r - t)`` of the flow through ``x`` at t
      (``r=None``: the instantaneous velocity ``u(x, t, t)``). Networks without the attribute
      take no ``r``.
    - Optionally, ``memory_format``: the layout the network runs fastest in (a convolutional
      network on a CPU: ``torch.channels_last``, ~20% faster than NCHW). The module puts the
      network's weights and its inputs in it; without the attribute they stay contiguous.

    Subclass :class:`flowdiff.config.Recorded` too (``class Net(Recorded, nn.Module)``) for a
    model built in plain Python to write a self-describing checkpoint; under the CLI the config
    describes it already.
    """

    num_classes: int

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor: ...


def size_from_data(net: Any, sizes: dict, num_classes: int) -> None:
    """Set the data-fixed arguments of a network config ``net`` (``class_path`` and
    ``init_args``, a dict or a jsonargparse Namespace) in place: each of ``sizes`` (from
    :meth:`flowdiff.data.base.FlowDataModule.network_sizes`) that the class takes, and
    ``num_classes`` when it takes one and the config leaves it None."""
    parameters = inspect.signature(import_class(net["class_path"]).__init__).parameters
    if net.get("init_args") is None:
        net["init_args"] = {}
    init_args = net["init_args"]
    for name, value in sizes.items():
        if name in parameters:
            init_args[name] = value
    if "num_classes" in parameters and init_args.get("num_classes") is None:
        init_args["num_classes"] = num_classes
