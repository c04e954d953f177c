"""MNIST for image flow matching: the datamodule.

Pixels are mapped from uint8 ``v`` to ``x = v / 255 * 2 - 1`` in [-1, 1] (background -1). Where the
files come from is :mod:`flowdiff.data.mnist_files`.

``python -m flowdiff.data.mnist --data-dir data`` prepares the data (``make data``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.data.base import FlowDataModule, check_arguments
from flowdiff.data.batches import Batches
from flowdiff.data.evaluators import EvalOptions
from flowdiff.data.image_evaluation import ImageEvaluator, ImageSource
from flowdiff.data.mnist_files import find_or_prepare_mnist, load_split
from flowdiff.metrics.pixels import pixels_to_float
from flowdiff.utils import UsageError


class MNISTDataModule(FlowDataModule):
    """MNIST batches ``(x, y)``: x (B, 1, 28, 28) float32 in [-1, 1] (or 32x32), y (B,) long.

    Training and validation split the official 60k training images (seeded); test is the official
    10k test set. Each split is held in memory as one uint8 tensor and batches are slices of it.

    Args:
        data_dir: where MNIST lives in torchvision's layout (``<data_dir>/MNIST/raw``) or is put.
        batch_size: batch size of all loaders.
        val_size: number of training images held out for validation.
        pad_to_32: pad the images to 32x32 with the background value -1 (U-Nets halving 3 times).
        p_uncond: label dropout probability for classifier-free guidance (training batches only).
        seed: seed of the train/validation split and of the training order.
        download: let torchvision download MNIST when it is not found otherwise.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 250,
        val_size: int = 5000,
        pad_to_32: bool = False,
        p_uncond: float = 0.1,
        seed: int = 0,
        download: bool = True,
    ):
        super().__init__()
        _check_arguments(data_dir, batch_size, val_size, p_uncond, seed)
        self.save_hyperparameters()
        self.p_uncond = float(p_uncond)
        self.num_classes = 10
        self.class_names = [str(k) for k in range(10)]
        self.data_shape = (1, 32, 32) if pad_to_32 else (1, 28, 28)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None

    def prepare_data(self) -> None:
        find_or_prepare_mnist(self.hparams.data_dir, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        """Load all splits into memory (once): uint8 images (N, *data_shape) and long labels."""
        if self.splits:
            return
        raw = find_or_prepare_mnist(self.hparams.data_dir, self.hparams.download)
        images, labels = load_split(raw, train=True)
        if not self.hparams.val_size < len(labels):
            raise UsageError(
                f"data.val_size must be smaller than the {len(labels)} training images, "
                f"got {self.hparams.val_size}"
            )
        perm = torch.randperm(len(labels), generator=_seeded(self.hparams.seed))
        self.val_indices = perm[: self.hparams.val_size].sort().values
        self.train_indices = perm[self.hparams.val_size :].sort().values
        test_images, test_labels = load_split(raw, train=False)
        images, test_images = self._shape(images), self._shape(test_images)
        self.splits = {
            "train": (images[self.train_indices], labels[self.train_indices]),
            "val": (images[self.val_indices], labels[self.val_indices]),
            "test": (test_images, test_labels),
        }

    def training_labels(self) -> Tensor:
        self.setup()
        return self.splits["train"][1]

    def _shape(self, images: Tensor) -> Tensor:
        """(N, 28, 28) uint8 to (N, *data_shape), padded with 0 (-1 once scaled)."""
        images = images.unsqueeze(1)
        return F.pad(images, (2, 2, 2, 2), value=0) if self.hparams.pad_to_32 else images

    def _loader(self, split: str, generator: torch.Generator | None = None, shard=(0, 1)):
        if not self.splits:
            self.setup()
        images, labels = self.splits[split]
        batches = Batches(images, labels, self.hparams.batch_size, generator, *shard)
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        # Under DDP each rank trains on its own share of the epoch (validation and test stay whole
        # on every rank).
        return self._loader("train", *self.epoch_order())

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` test images (a subset chosen by ``seed``) in [-1, 1], and their labels."""
        raw = find_or_prepare_mnist(self.hparams.data_dir, self.hparams.download)
        images, labels = load_split(raw, train=False)
        pick = torch.randperm(len(labels), generator=_seeded(seed))[:n]
        return pixels_to_float(self._shape(images[pick])), labels[pick]

    def evaluator(self, options: EvalOptions | None = None) -> ImageEvaluator:
        """Metrics in the features of flowdiff's own MNIST classifier (trained once, cached)."""

        def raw():
            return find_or_prepare_mnist(self.hparams.data_dir, self.hparams.download)

        @functools.cache
        def splits():  # read once: the reference, the floor and the classifier share them
            return load_split(raw(), train=True), load_split(raw(), train=False)

        def load():
            train, test = splits()
            return (self._shape(train[0]), train[1]), (self._shape(test[0]), test[1])

        def features(train, test, log, options: EvalOptions):
            from flowdiff.metrics.classifier import default_cache, load_or_train_classifier

            cache = options.cache_dir or default_cache()
            log(f"MNIST feature classifier: cache {cache}")
            model, info = load_or_train_classifier(
                *splits(), cache, options.min_accuracy, progress=True
            )
            state = "trained" if info.trained else "loaded"
            log(f"classifier {state}: {info.path} (test accuracy {info.test_accuracy:.4f})")
            accuracy = f"test accuracy {info.test_accuracy:.4f}"
            line = f"flowdiff MNIST classifier {info.path.name} ({accuracy})"
            return model, line

        source = ImageSource(load, features, pixels_to_float, check=raw)
        return ImageEvaluator(source, self.num_classes, options, self.class_names)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_arguments(data_dir: str, batch_size: int, val_size: int, p_uncond: float, seed: int):
    """Raise UsageError naming the first bad argument of MNISTDataModule."""
    if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
        raise UsageError(f"data.data_dir must be a non-empty path, got {data_dir!r}")
    check_arguments({"batch_size": batch_size, "val_size": val_size}, seed, p_uncond)


def main(argv: list[str] | None = None) -> int:
    """``python -m flowdiff.data.mnist --data-dir DIR``: prepare MNIST and print where it is."""
    parser = argparse.ArgumentParser(description="Find or prepare MNIST in torchvision's layout.")
    parser.add_argument("--data-dir", default="data", help="root folder (default: data)")
    parser.add_argument("--no-download", action="store_true", help="never download")
    args = parser.parse_args(argv)
    try:
        raw = find_or_prepare_mnist(args.data_dir, download=not args.no_download)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MNIST ready in {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
