"""The network as ``flowdiff sample`` and ``evaluate`` run it: on a device, at a precision, compiled
or not. Only the network runs in reduced precision; the sampler's state stays in float32."""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor, nn

from flowdiff.speed import AUTO, SpeedChoice, choose, device_kind
from flowdiff.utils import UsageError

Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def add_network_flags(add) -> None:
    """``--precision`` and ``--compile``, as ``sample`` and ``evaluate`` take them
    (``add``: a parser's ``add_argument``)."""
    add(
        "--precision",
        type=Precision | Literal["auto"],
        default=AUTO,
        help="The network's precision (autocast; the sampler stays in float32). auto: "
        "bf16-mixed on a CUDA GPU with bf16 or a CPU with AMX-BF16, 16-mixed on other GPUs, "
        "32-true on other CPUs.",
    )
    add(
        "--compile",
        type=bool | Literal["auto"],
        default=AUTO,
        help="Compile the network (torch.compile). auto: on with bf16 on a CPU with AMX-BF16 "
        "(where it paid in bench/), off elsewhere.",
    )


def resolve_device(name: str) -> torch.device:
    """``auto``: the CUDA GPU when there is one, else the CPU; otherwise a device torch knows and
    this machine has (``cpu``, ``cuda``, ``cuda:1``...), or one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"--device {name!r} is not available here ({reason}); use auto, cpu, cuda or cuda:N"
        ) from err
    return device


def network_speed(precision: str, compile: bool | str, device: torch.device) -> SpeedChoice:
    """``--precision`` and ``--compile`` on ``device``, ``auto`` resolved by the rule of
    :mod:`flowdiff.speed` (the hardware's, as for training)."""
    return choose(precision, compile, device_kind(device))


class InferenceNetwork:
    """``net(x, t, y)`` under ``torch.autocast`` at a mixed precision, its output back in ``x``'s
    dtype (the sampler integrates in float32), compiled with ``torch.compile`` when asked.

    Not a module: the model's state dict and checkpoints never see it. ``compile_seconds`` is the
    wall time of the first call of a compiled network (compilation and one forward).
    """

    def __init__(self, net: nn.Module, precision: Precision = "32-true", compile: bool = False):
        if precision not in AUTOCAST_DTYPES:
            raise UsageError(f"precision {precision!r}: expected one of {list(AUTOCAST_DTYPES)}")
        self.net, self.precision, self.compiled = net, precision, compile
        self.num_classes = getattr(net, "num_classes", 0)
        self.interval = getattr(net, "interval", False)  # an average-velocity network (MeanFlow)
        self._dtype = AUTOCAST_DTYPES[precision]
        self._forward = torch.compile(net) if compile else net
        self.compile_seconds: float | None = None

    def __call__(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None
    ) -> Tensor:
        start = time.perf_counter() if self.compiled and self.compile_seconds is None else None
        with torch.autocast(x.device.type, dtype=self._dtype, enabled=self._dtype is not None):
            out = self._forward(x, t, y) if r is None else self._forward(x, t, y, r)
        if start is not None:
            self.compile_seconds = time.perf_counter() - start
            print(f"flowdiff: network compiled in {self.compile_seconds:.1f} s (its first call)")
        return out.to(x.dtype)
