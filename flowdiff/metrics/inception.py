"""Inception-v3 features for FID and KID from a weights file the user has (never downloaded).

Two kinds of file are read:

- **TorchScript** (e.g. the ``inception-2015-12-05.pt`` of StyleGAN/EDM's metrics): called as
  ``model(x, return_features=True)`` (or ``model(x)`` when it takes no such argument) on float
  images (N, 3, H, W) with values 0..255; it resizes them itself.
- **torch-fidelity's** ``pt_inception-2015-12-05-6726825d.pth``: through torchmetrics'
  ``NoTrainInceptionV3`` (needs ``pip install torch-fidelity``), on uint8 images.

Grey images are repeated to three channels. The reference set's features are computed once and
cached (:func:`reference_features`), keyed by the weights file's content and the reference
images, so a second evaluation of the same data does not compute them again.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from flowdiff.utils import UsageError, atomic_path

FEATURE_BATCH = 100


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled code)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def check_inception(weights: str | Path) -> None:
    """Everything Inception features need, checked before any work: the weights file, and
    torch-fidelity for a file that is not TorchScript."""
    if not Path(weights).is_file():
        raise UsageError(f"--inception-weights {str(weights)!r}: no such file")
    if is_torchscript(weights):
        return
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"--inception-weights {str(weights)!r} is not TorchScript, and torch-fidelity's "
            "weights need torch-fidelity (pip install torch-fidelity); flowdiff downloads nothing"
        ) from err


def load_inception(weights: str | Path) -> Callable[[Tensor], Tensor]:
    """``extract(uint8 images (N, 3, H, W)) -> features (N, F)`` read from ``weights``."""
    check_inception(weights)
    if is_torchscript(weights):
        model = torch.jit.load(str(weights), map_location="cpu").eval()
        takes_flag = []

        def extract(x: Tensor) -> Tensor:
            x = x.float()
            if not takes_flag:
                try:
                    out = model(x, return_features=True)
                    takes_flag.append(True)
                    return out
                except (RuntimeError, TypeError):
                    takes_flag.append(False)
            return model(x, return_features=True) if takes_flag[0] else model(x)

        return extract
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"],
            feature_extractor_weights_path=str(weights),
        )  # fmt: skip
    except Exception as err:  # torch-fidelity's own error for a file that is not its weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--inception-weights {str(weights)!r}: cannot load ({first})") from err
    return lambda x: net(x).reshape(len(x), -1)


def to_rgb_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] to uint8 (N, 3, H, W) on the 8-bit levels of the data."""
    from flowdiff.metrics.images import _levels

    pixels = _levels(images).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


@torch.no_grad()
def inception_features(extract: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Features (N, F), float64, of float images (N, C, H, W) in [-1, 1]."""
    chunks = [
        extract(to_rgb_uint8(images[i : i + FEATURE_BATCH])).double().cpu()
        for i in range(0, len(images), FEATURE_BATCH)
    ]
    return torch.cat(chunks)


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference_features(
    extract: Callable[[Tensor], Tensor],
    images: Tensor,
    weights: str | Path,
    cache_dir: str | Path,
    log: Callable[[str], None] = lambda _: None,
) -> Tensor:
    """The features of the reference ``images``, from ``cache_dir`` when this weights file saw
    these images before, else computed now and cached."""
    h = hashlib.sha1(_file_digest(weights).encode())
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.contiguous().numpy().tobytes())
    path = Path(cache_dir) / f"inception-reference-{h.hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
            log(f"Inception reference features loaded from {path}")
            return features
        except Exception as err:  # a damaged cache file costs a recomputation, nothing more
            log(f"Inception cache {path} unreadable ({type(err).__name__}); recomputing")
    log(f"computing the Inception features of {len(images)} reference images (once)")
    features = inception_features(extract, images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(features, tmp)
    except OSError as err:
        log(f"cannot cache the Inception features in {path.parent} ({err}); not cached")
    return features
