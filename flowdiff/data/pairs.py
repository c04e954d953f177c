"""Labelled or captioned pairs from a tensor file: ``x`` (N, any shape) and optionally ``y`` (N,)
labels or ``text`` (N captions).

- ``.pt``: a dict with ``x`` (and ``y``, optionally ``class_names``, or ``text``: a list of
  strings, optionally with their embeddings ``tokens``, ``mask``, ``pooled``: see
  :class:`flowdiff.text.PrecomputedTextEncoder`), or a tensor (x alone);
- ``.npz``: arrays ``x`` (and ``y``, optionally ``class_names``, or ``text``: strings);
- ``.npy``: one array, x alone.

``x`` as **uint8 (N, C, H, W)** is images (pixel levels 0..255, mapped to [-1, 1]; the image
evaluation); anything else is **points**: float vectors of any shape, used as they are, evaluated
like the toy data (W2, MMD, NLL) against held-out points, with training points as the floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.data.base import FlowDataModule, check_arguments
from flowdiff.data.batches import Batches
from flowdiff.data.captions import CaptionTable
from flowdiff.data.evaluators import EvalOptions, Evaluator, PointEvaluator
from flowdiff.utils import UsageError

SUFFIXES = (".pt", ".npz", ".npy")


def _as_tensor(value) -> Tensor:
    return value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))


def read_pairs(path: str | Path) -> tuple[Tensor, Tensor | list[str] | None, list[str] | None]:
    """``(x, y or captions or None, class names or None)`` of a tensor file; a UsageError for a
    file that is missing, of another kind, without ``x``, or with both ``y`` and ``text``."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UsageError(f"data.path {str(path)!r}: expected a {', '.join(SUFFIXES)} file")
    if not path.is_file():
        raise UsageError(f"data.path {str(path)!r}: no such file")
    try:
        if path.suffix == ".npy":
            content = {"x": np.load(path, mmap_mode="r", allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                content = {k: archive[k] for k in archive.files}
        else:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UsageError(f"data.path {str(path)!r}: cannot read it ({type(err).__name__})") from err
    if isinstance(content, Tensor):
        content = {"x": content}
    if not isinstance(content, dict) or "x" not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise UsageError(f"data.path {str(path)!r} holds no 'x' (found {keys})")
    names = content.get("class_names")
    names = [str(n) for n in names] if names is not None else None
    y = content.get("y")
    if content.get("text") is not None:
        if y is not None:
            raise UsageError(f"data.path {str(path)!r} holds both labels y and captions text")
        text = content["text"]
        if isinstance(text, str) or not all(isinstance(c, str) for c in list(text)):
            raise UsageError(f"data.path {str(path)!r}: text must be a list of strings")
        return _as_tensor(content["x"]), [str(c) for c in text], None
    return _as_tensor(content["x"]), (_as_tensor(y) if y is not None else None), names


def holds_embeddings(path: str | Path) -> bool:
    """Whether a ``.pt`` file holds ``tokens`` (text embeddings, read memory-mapped)."""
    if Path(path).suffix != ".pt":
        return False
    content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return isinstance(content, dict) and "tokens" in content


def check_pairs(x: Tensor, y: Tensor | list[str] | None, where: str) -> None:
    if x.dim() < 2 or len(x) < 2:
        raise UsageError(f"{where}: x must be (N, ...) with N >= 2 samples, got {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise UsageError(f"{where}: x must be float (points) or uint8 images, got {x.dtype}")
    if isinstance(y, list):
        if len(y) != len(x):
            raise UsageError(f"{where}: text must hold one caption per sample: {len(x)} samples, "
                             f"{len(y)} captions")  # fmt: skip
        return
    if y is None:
        return
    if y.dim() != 1 or len(y) != len(x):
        raise UsageError(
            f"{where}: y must hold one label per sample of x: x has {len(x)}, y is {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise UsageError(f"{where}: labels y must be integers, got {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise UsageError(f"{where}: labels y must be >= 0, got {int(y.min())}")


class TensorPairsDataModule(FlowDataModule):
    """Batches ``(x, y)`` of the samples in a tensor file (see the module docstring).

    A fixed, seeded ``val_fraction`` is held out: validation, and the reference of ``flowdiff
    evaluate``. Under DDP each rank trains on its own share of every epoch.

    Args:
        path: the ``.pt``, ``.npz`` or ``.npy`` file.
        p_uncond: label (caption) dropout probability for classifier-free guidance (labelled or
            captioned data).
        batch_size: batch size of all loaders.
        val_fraction: share of the samples held out (at least one).
        seed: seed of the held-out split and of the training order.
    """

    def __init__(
        self,
        path: str | None = None,
        p_uncond: float = 0.1,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        if path is None:
            raise UsageError("data.path is required: a .pt, .npz or .npy file holding x (and y)")
        check_arguments({"batch_size": batch_size}, seed, p_uncond, {"val_fraction": val_fraction})
        self.save_hyperparameters()
        x, y, names = read_pairs(path)
        check_pairs(x, y, f"data.path {str(path)!r}")
        self.images = x.dtype == torch.uint8 and x.dim() == 4
        self.x = x
        self.captioned = isinstance(y, list)
        # A .pt file may hold the captions' embeddings beside them (tokens, mask, pooled): the
        # CLI then reads them with flowdiff.text.PrecomputedTextEncoder (path: this file).
        self.text_embeddings = str(path) if self.captioned and holds_embeddings(path) else None
        if self.captioned:
            self.y = CaptionTable([[caption] for caption in y], seed)
            y = None
        else:
            self.y = y.long() if y is not None else torch.zeros(len(x), dtype=torch.long)
        self.num_classes = int(self.y.max()) + 1 if y is not None else 0
        if names is not None and len(names) != self.num_classes:
            raise UsageError(
                f"data.path {str(path)!r}: {len(names)} class_names for {self.num_classes} classes"
            )
        self.class_names = names or ([str(k) for k in range(self.num_classes)] or None)
        self.p_uncond = float(p_uncond) if self.num_classes or self.captioned else 0.0
        self.data_shape = tuple(x.shape[1:])
        n_val = max(1, int(np.ceil(val_fraction * len(x))))
        if n_val >= len(x):
            raise UsageError(f"data.val_fraction {val_fraction} of {len(x)} samples leaves none")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        self.train_rows, self.val_rows = perm[n_val:].sort().values, perm[:n_val].sort().values

    def captions(self) -> list[str]:
        return self.y.index_select(0, self.train_rows) if self.captioned else super().captions()

    def training_labels(self) -> Tensor:
        return self.y[self.train_rows]

    def _convert(self, x: Tensor) -> Tensor:
        from flowdiff.metrics.pixels import pixels_to_float

        return pixels_to_float(x) if self.images else x.float()

    def _loader(self, rows: Tensor, generator=None, shard=(0, 1)) -> DataLoader:
        batches = Batches(
            self.x, self.y, self.hparams.batch_size, generator, *shard, rows, convert=self._convert
        )
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, *self.epoch_order())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows)

    def _draw(self, rows: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` of ``rows`` in a seeded order (cycling through them when n is larger)."""
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        pick = rows[order.repeat(-(-n // len(rows)))[:n]]
        return self._convert(self.x[pick]), self.y.index_select(0, pick)

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` held-out samples (chosen by ``seed``; each once while n allows) and labels."""
        return self._draw(self.val_rows, n, seed)

    def evaluator(self, options: EvalOptions | None = None) -> Evaluator:
        if self.images and self.captioned:
            from flowdiff.data.caption_evaluation import CaptionedImageEvaluator

            def train_pairs():
                return self.x[self.train_rows], [
                    self.y.captions[i] for i in self.train_rows.tolist()
                ]

            def reference(n: int, seed: int):
                g = torch.Generator().manual_seed(seed)
                order = torch.randperm(len(self.val_rows), generator=g)
                pick = self.val_rows[order.repeat(-(-n // len(self.val_rows)))[:n]]
                return self.x[pick], self.y.index_select(0, pick)

            return CaptionedImageEvaluator(train_pairs, reference, self.data_shape, options)
        if self.images:
            from flowdiff.data.image_evaluation import ImageEvaluator, labelled_source

            def load():
                train, val = self.train_rows, self.val_rows
                return (self.x[train], self.y[train]), (self.x[val], self.y[val])

            source = labelled_source(load, self.data_shape, self.num_classes)
            return ImageEvaluator(source, self.num_classes, options, self.class_names)

        def floor(n: int, seed: int) -> tuple[Tensor, Tensor]:
            return self._draw(self.train_rows, n, seed)

        names = ("held-out points", "training points")
        evaluator = PointEvaluator(self.reference, self.num_classes, floor, names)
        evaluator.num_samples = min(evaluator.num_samples, len(self.val_rows))
        evaluator.nll_samples = min(evaluator.nll_samples, len(self.val_rows))
        return evaluator
