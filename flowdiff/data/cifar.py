"""CIFAR-10 in torchvision's on-disk format (``<data_dir>/cifar-10-batches-py``): found there, or
downloaded by torchvision where a network exists. The 50k training images (less a seeded
validation split) train; the 10k test images are the floor of the evaluation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.data.base import FlowDataModule, check_arguments
from flowdiff.data.batches import Batches
from flowdiff.data.evaluators import EvalOptions
from flowdiff.data.image_evaluation import ImageEvaluator
from flowdiff.utils import UsageError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _read(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.as_tensor(batch["labels"], dtype=torch.long)


def find_or_download(data_dir: str, download: bool) -> Path:
    """``<data_dir>/cifar-10-batches-py``, downloaded by torchvision when missing and allowed."""
    folder = Path(data_dir) / FOLDER
    if not (folder / "batches.meta").is_file() and download:
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(data_dir, train=True, download=True)
        except Exception as err:  # no network, a proxy, a full disk: one line
            raise UsageError(f"cannot download CIFAR-10 into {data_dir!r}: {err}") from err
    missing = [
        n for n in ["batches.meta", *TRAIN_FILES, "test_batch"] if not (folder / n).is_file()
    ]
    if missing:
        raise UsageError(
            f"CIFAR-10 not found in {str(folder)!r} (missing {missing[0]}); download it where a "
            "network exists (--data.init_args.download true) or copy it there"
        )
    return folder


class CIFAR10DataModule(FlowDataModule):
    """CIFAR-10 batches ``(x, y)``: x (B, 3, 32, 32) in [-1, 1], y (B,) long; 10 named classes.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py`` (or where it is downloaded).
        batch_size: batch size of all loaders.
        val_size: training images held out for validation.
        random_flip: mirror training images left-right with probability 1/2.
        p_uncond: label dropout probability for classifier-free guidance.
        seed: seed of the validation split and of the training order.
        download: let torchvision download CIFAR-10 when it is not in ``data_dir``.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_size: int = 1000,
        random_flip: bool = True,
        p_uncond: float = 0.1,
        seed: int = 0,
        download: bool = True,
    ):
        super().__init__()
        check_arguments({"batch_size": batch_size, "val_size": val_size}, seed, p_uncond)
        self.save_hyperparameters()
        self.p_uncond, self.num_classes, self.data_shape = float(p_uncond), 10, (3, 32, 32)
        self.class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]  # fmt: skip
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def prepare_data(self) -> None:
        find_or_download(self.hparams.data_dir, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        folder = find_or_download(self.hparams.data_dir, self.hparams.download)
        parts = [_read(folder / name) for name in TRAIN_FILES]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if not 0 < self.hparams.val_size < len(labels):
            raise UsageError(f"data.val_size must be in 1..{len(labels) - 1}")
        perm = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(self.hparams.seed)
        )
        train, val = perm[self.hparams.val_size :].sort().values, perm[: self.hparams.val_size]
        val = val.sort().values
        self.splits = {
            "train": (images[train], labels[train]),
            "val": (images[val], labels[val]),
            "test": _read(folder / "test_batch"),
        }

    def training_labels(self) -> Tensor:
        self.setup()
        return self.splits["train"][1]

    def _loader(self, split: str, generator=None, shard=(0, 1), flip=False) -> DataLoader:
        self.setup()
        images, labels = self.splits[split]
        batches = Batches(images, labels, self.hparams.batch_size, generator, *shard, flip=flip)
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", *self.epoch_order(), self.hparams.random_flip)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` test images (chosen by ``seed``) in [-1, 1], and their labels."""
        from flowdiff.metrics.pixels import pixels_to_float

        self.setup()
        images, labels = self.splits["test"]
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
        return pixels_to_float(images[pick]), labels[pick]

    def evaluator(self, options: EvalOptions | None = None) -> ImageEvaluator:
        """In the features of a classifier trained once on the training split (Inception FID/KID
        with --inception-weights), bits/dim on test images."""
        from flowdiff.data.image_evaluation import labelled_source

        def load():
            self.setup()
            return self.splits["train"], self.splits["test"]

        def check():
            find_or_download(self.hparams.data_dir, download=False)

        source = labelled_source(load, self.data_shape, self.num_classes, check)
        return ImageEvaluator(source, self.num_classes, options, self.class_names)
