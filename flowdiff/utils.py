"""Small helpers shared by the core modules."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor


def default_cache() -> Path:
    """Where flowdiff keeps what it computes once (classifiers, decoded images, reference
    statistics): ``$FLOWDIFF_CACHE``, else ``~/.cache/flowdiff``."""
    return Path(os.environ.get("FLOWDIFF_CACHE") or Path.home() / ".cache" / "flowdiff")


class UsageError(ValueError):
    """Bad input from the user: the CLI prints its message on one line and exits non-zero."""


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``t`` of shape (B,) to broadcast against ``x`` of shape (B, *D).

    The one place where time is broadcast against data, so points and images share all code.
    """
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def as_time(t: float | Tensor, x: Tensor) -> Tensor:
    """A (B,) time tensor on ``x``'s device and dtype from a scalar or a (B,) tensor."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back to the OS.

    By default, blocks above a dynamic threshold (128 KB to 32 MB) are mmap-ed and unmapped on
    every free, so each training or sampling step page-faults its activations in again: sampling
    a small U-Net spent 20% of its time in the kernel doing that. Raising the mmap threshold to its
    maximum and the trim threshold above it keeps the memory in the heap. Returns whether it
    applied (glibc only; elsewhere nothing changes).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum on 64-bit
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
        ok &= libc.mallopt(m_top_pad, 64 * 2**20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def skip_nvml_probe_without_driver() -> bool:
    """Drop ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (which importing Lightning sets) on a machine with
    no NVIDIA driver, where it only costs time.

    Lightning sets it so that ``torch.cuda.is_available()`` asks NVML instead of initializing CUDA
    (which would forbid CUDA in forked processes). Until CUDA is initialized, PyTorch then loads
    the NVML library at every call, and Adam's ``step`` makes one call a step: on a CUDA build of
    PyTorch without the driver, a failed ``dlopen`` a step (~55 us, ~1% of a toy step). Without
    the library PyTorch falls back to the CUDA runtime's count all the same, so the answer, and
    what a forked process may do, are unchanged. Returns whether it dropped the setting.
    """
    import ctypes

    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or not torch.backends.cuda.is_built():
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # the library PyTorch loads (torch.cuda)
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        return True
    return False


def stable_compile_cache() -> str | None:
    """Keep torch.compile's caches (inductor's FX graphs and kernels, AOTAutograd's) in the
    user's cache directory, so that a second ``fit`` or ``sample`` of the same network loads the
    compiled code instead of compiling it again: ``$TORCHINDUCTOR_CACHE_DIR`` when the user set
    it (kept as it is), else ``$FLOWDIFF_CACHE/inductor``, ``$XDG_CACHE_HOME/flowdiff/inductor``
    or ``~/.cache/flowdiff/inductor``. Inductor's own default is a folder in ``/tmp``, which many
    machines empty at every boot, and which importing ``torch._dynamo`` (Lightning does) writes
    into ``$TORCHINDUCTOR_CACHE_DIR``: that value is not the user's, and is replaced. Call it
    before anything compiles. Returns the folder set (None: the setting was left alone)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # private, torch <= 2.14 (pyproject)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        inductors_own = os.path.abspath(default_cache_dir())
    except (ImportError, AttributeError):
        inductors_own = None
    if current and os.path.abspath(current) != inductors_own:
        return None
    if os.environ.get("FLOWDIFF_CACHE"):
        folder = Path(os.environ["FLOWDIFF_CACHE"]) / "inductor"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base) / "flowdiff" / "inductor"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: inductor's default folder in /tmp
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.absolute())
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file all at once: yields a temporary path beside ``path`` and, when the block
    finishes without an exception, renames it over ``path`` (atomic on POSIX). A crash or an error
    mid-write leaves whatever stood at ``path`` untouched and removes the partial file.

    Example::

        with atomic_path(out / "samples.pt") as tmp:
            torch.save(payload, tmp)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data reaches the disk before the name points at it
            os.fsync(f.fileno())
        if not tmp.is_symlink():  # mkstemp's 0600 to what open() would have given: 0666 - umask
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
