"""``precision: auto`` and ``compile: auto``: the fast settings chosen from the hardware.

The rule, for training (``flowdiff fit``) and for the network in ``sample``, ``evaluate`` and
``reflow``:

=====================================  ==============  ==============
where the network runs                 precision       compile
=====================================  ==============  ==============
a CUDA GPU with bf16                   ``bf16-mixed``  off
another CUDA GPU                       ``16-mixed``    off
a CPU whose PyTorch reports AMX-BF16   ``bf16-mixed``  on (with bf16)
any other CPU (or device)              ``32-true``     off
=====================================  ==============  ==============

Compilation is on where it paid in ``bench/`` (``mnist_throughput.py --compiled``,
``compile.py``; figures in the README's "Speed"): with bf16 on an AMX CPU. It is off where
``bench/`` showed no gain after compile time (fp32, on AMX or not; CPUs without AMX) and where
nothing has been measured yet (GPUs: ``bench/gpu.py``). Explicit values always win.

AMX-BF16 is read from ``torch.cpu.get_capabilities()`` (cpuinfo), the table PyTorch's own
inductor reads (``torch.cpu._is_amx_tile_supported``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

AUTO = "auto"


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles with bf16 (Intel Sapphire Rapids and later), as PyTorch
    reports it."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # torch < 2.8: the tile check alone (every AMX CPU has AMX-BF16)
        return bool(torch.cpu._is_amx_tile_supported())
    return bool(capabilities().get("amx_bf16", False))


def cpu_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler that torch.compile needs on a CPU (slim containers
    have none): without it, ``compile: auto`` stays off rather than fail at the first step."""
    try:  # inductor's own search (CXX, then g++ and the like); private, torch <= 2.14 (pyproject)
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor laid out otherwise
        return False
    return True


def device_kind(accelerator) -> Literal["cuda", "cpu", "other"]:
    """Where a trainer with this ``accelerator`` (``auto``, ``cpu``, ``gpu``, ``cuda``, an
    Accelerator...) or a ``torch.device`` runs the network."""
    if isinstance(accelerator, torch.device):
        accelerator = accelerator.type
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("auto", "cpu") or isinstance(accelerator, CPUAccelerator):
        return "cpu"
    if isinstance(accelerator, CUDAAccelerator) and torch.cuda.is_available():
        return "cuda"
    return "other"


@dataclass(frozen=True)
class SpeedChoice:
    """The precision and compilation a run uses, and why (``reason``: what ``auto`` saw)."""

    precision: str
    compile: bool
    reason: str
    auto: tuple[str, ...]  # which of the two were "auto"

    def line(self) -> str:
        """One line for the start of a run: ``flowdiff: precision ..., compile ...``."""
        said = [
            f"precision {self.precision}" + (" (auto)" if "precision" in self.auto else ""),
            f"compile {str(self.compile).lower()}" + (" (auto)" if "compile" in self.auto else ""),
        ]
        why = f": {self.reason}" if self.auto else ""
        return f"flowdiff: {', '.join(said)}{why}"


def choose(precision, compile, kind: Literal["cuda", "cpu", "other"]) -> SpeedChoice:
    """Resolve ``precision`` and ``compile`` (each a value or ``"auto"``) for a device of this
    kind by the rule of this module; values other than ``auto`` are kept as given."""
    amx = kind == "cpu" and cpu_has_amx_bf16()
    bf16_gpu = kind == "cuda" and torch.cuda.is_bf16_supported()
    if kind == "cuda":
        reason = "a CUDA GPU " + ("with bf16" if bf16_gpu else "without bf16")
    elif kind == "cpu":
        reason = "a CPU " + ("with AMX-BF16" if amx else "without AMX-BF16")
    else:
        reason = "neither a CUDA GPU nor a CPU"
    auto = tuple(name for name, v in (("precision", precision), ("compile", compile)) if v == AUTO)
    if precision is None:  # Lightning's own default
        precision = "32-true"
    if precision == AUTO:
        precision = "bf16-mixed" if amx or bf16_gpu else "16-mixed" if kind == "cuda" else "32-true"
    if compile == AUTO:
        compile = amx and str(precision) == "bf16-mixed"
        if compile and not cpu_compiler_found():
            compile, reason = False, reason + " (no C++ compiler for torch.compile)"
    return SpeedChoice(precision, bool(compile), reason, auto)


class FlowTrainer(Trainer):
    """Lightning's Trainer whose ``precision`` also takes ``auto`` (the default): the rule of
    :mod:`flowdiff.speed` for its accelerator."""

    def __init__(
        self, *args, precision: _PRECISION_INPUT | Literal["auto"] | None = AUTO, **kwargs
    ):
        if precision == AUTO:
            kind = device_kind(kwargs.get("accelerator", "auto"))
            precision = choose(AUTO, False, kind).precision
        super().__init__(*args, precision=precision, **kwargs)
