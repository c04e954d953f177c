"""Your own images: a folder of image files, in torchvision's ``ImageFolder`` layout (labelled) or
flat (unlabelled), or captioned (``metadata.jsonl`` or a ``.txt`` beside each image), in grey or
colour and any size (:mod:`flowdiff.data.image_files`, :mod:`flowdiff.data.image_captions`)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.data.base import FlowDataModule, check_arguments
from flowdiff.data.batches import Batches
from flowdiff.data.captions import CaptionTable
from flowdiff.data.evaluators import EvalOptions
from flowdiff.data.image_captions import CaptionedImages, read_captions
from flowdiff.data.image_evaluation import ImageEvaluator
from flowdiff.data.image_files import ImageCache, ImageList, build_cache, scan
from flowdiff.utils import UsageError, default_cache


class ImageFolderDataModule(FlowDataModule):
    """Batches ``(x, y)`` of the images under ``root``: x (B, C, S, S) in [-1, 1], y (B,) labels
    or, for a captioned folder, a list of B captions (one drawn per read of an image with several).

    The images are decoded once into a uint8 cache (``cache_dir``, default
    ``$FLOWDIFF_CACHE/images`` or ``~/.cache/flowdiff/images``) that later epochs and runs
    memory-map: nothing is decoded again, and data larger than memory trains. A fixed, seeded
    ``val_fraction`` of the images is held out: validation, and the floor of ``flowdiff
    evaluate``. Under DDP each rank trains on its own share of every epoch.

    Args:
        root: a folder with one sub-folder of images per class (labels; the folder names are the
            class names) or a folder of images (no labels); captions, when it has them, take the
            place of labels (:mod:`flowdiff.data.image_captions`).
        image_size: side S of the square images: the short side is resized to S, then cropped.
        channels: 1 (grey) or 3 (RGB); images are converted as asked.
        random_flip: mirror training images left-right with probability 1/2.
        p_uncond: label (caption) dropout probability for classifier-free guidance (labelled or
            captioned data).
        batch_size: batch size of all loaders.
        val_fraction: share of the images held out (at least one).
        seed: seed of the held-out split and of the training order.
        cache_dir: where the decoded images are kept.
        decode_workers: processes decoding the images (default: all cores).
        skip_unreadable: leave out files Pillow cannot read (counted) instead of stopping.
        captions: where the captions are: ``metadata`` (``metadata.jsonl`` at the root),
            ``txt`` (beside each image), ``none`` (ignore them), or ``auto`` (whichever the
            folder has; none: labels or nothing).
        skip_uncaptioned: leave out images without a caption (counted) instead of stopping.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 32,
        channels: Literal[1, 3] = 3,
        random_flip: bool = False,
        p_uncond: float = 0.1,
        batch_size: int = 128,
        val_fraction: float = 0.05,
        seed: int = 0,
        cache_dir: str | None = None,
        decode_workers: int | None = None,
        skip_unreadable: bool = False,
        captions: Literal["auto", "metadata", "txt", "none"] = "auto",
        skip_uncaptioned: bool = False,
    ):
        super().__init__()
        if root is None:
            raise UsageError(
                "data.root is required: the folder of your images (--data.init_args.root PATH)"
            )
        check_arguments({"image_size": image_size, "batch_size": batch_size}, seed, p_uncond,
                        {"val_fraction": val_fraction})  # fmt: skip
        if channels not in (1, 3) or isinstance(channels, bool):
            raise UsageError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.save_hyperparameters()
        self.data_shape = (channels, image_size, image_size)
        self._cache: ImageCache | None = None

    # The folder is read when first asked (the CLI asks at once, to size the network): a model
    # loaded from a checkpoint samples with the classes it recorded, without the images.
    @functools.cached_property
    def captioned_images(self) -> CaptionedImages | None:
        """The captioned images, or None for a folder without captions (read once)."""
        found = read_captions(
            scan(self.hparams.root), self.hparams.captions,
            self.hparams.skip_uncaptioned,
        )  # fmt: skip
        if found is not None and found.skipped:
            announce(f"flowdiff: {found.skipped} image(s) without a caption left out "
                     f"(skip_uncaptioned) of {self.hparams.root}")  # fmt: skip
        return found

    @functools.cached_property
    def files(self) -> ImageList:
        found = self.captioned_images
        return found.files if found is not None else scan(self.hparams.root)

    @property
    def captioned(self) -> bool:
        if self.recorded is not None:
            return self.recorded.get("conditioning") == "text"
        return self.captioned_images is not None

    @property
    def class_names(self) -> list[str] | None:
        if self.recorded is not None:
            return self.recorded["class_names"]
        return self.files.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    @property
    def p_uncond(self) -> float:
        return float(self.hparams.p_uncond) if self.num_classes or self.captioned else 0.0

    def captions(self) -> list[str]:
        """Every caption of every training image."""
        if not self.captioned:
            return super().captions()
        table = self.captioned_images.captions
        return [caption for row in self.split()[0].tolist() for caption in table[row]]

    # ----------------------------------------------------------------------------- data

    def cache_folder(self) -> Path:
        settings = {"image_size": self.data_shape[1], "channels": self.data_shape[0]}
        base = Path(self.hparams.cache_dir or default_cache() / "images")
        name = Path(self.hparams.root).resolve().name or "root"
        return base / f"{name}-{self.files.key(settings)[:16]}"

    def prepare_data(self) -> None:
        self.cache()

    def cache(self) -> ImageCache:
        """The decoded images (built now if needed)."""
        if self._cache is None:
            channels, size = self.data_shape[0], self.data_shape[1]
            self._cache = build_cache(
                self.files, self.cache_folder(), size, channels, self.hparams.decode_workers,
                self.hparams.skip_unreadable,
            )  # fmt: skip
        return self._cache

    def split(self) -> tuple[Tensor, Tensor]:
        """The row indices of the training and the held-out images (seeded, sorted)."""
        rows = torch.from_numpy(self.cache().rows)
        n_val = max(1, math.ceil(self.hparams.val_fraction * len(rows)))
        if n_val >= len(rows):
            raise UsageError(
                f"data.val_fraction {self.hparams.val_fraction} of {len(rows)} images leaves "
                "none to train on"
            )
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.hparams.seed))
        return rows[perm[n_val:]].sort().values, rows[perm[:n_val]].sort().values

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images uint8 (N, C, S, S), memory-mapped, and labels (N,)."""
        cache = self.cache()
        return torch.from_numpy(cache.images), torch.from_numpy(cache.labels)

    @functools.cached_property
    def caption_table(self) -> CaptionTable:
        """The captions of all images (captioned folders), in the place of the labels."""
        return CaptionTable(self.captioned_images.captions, self.hparams.seed)

    def conditions(self) -> Tensor | CaptionTable:
        """What ``y`` is read from: the captions of a captioned folder, else the labels."""
        return self.caption_table if self.captioned else self.tensors()[1]

    def setup(self, stage: str | None = None) -> None:
        self.cache()

    def training_labels(self) -> Tensor:
        return self.tensors()[1][self.split()[0]]

    def _loader(self, rows: Tensor, generator=None, shard=(0, 1), flip=False) -> DataLoader:
        batches = Batches(self.tensors()[0], self.conditions(), self.hparams.batch_size, generator,
                          *shard, rows, flip)  # fmt: skip
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split()[0], *self.epoch_order(), self.hparams.random_flip)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split()[1])

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor | list[str]]:
        """``n`` held-out images (chosen by ``seed``) in [-1, 1], and their labels (captions)."""
        from flowdiff.metrics.pixels import pixels_to_float

        held_out = self.split()[1]
        g = torch.Generator().manual_seed(seed)
        rows = held_out[torch.randperm(len(held_out), generator=g)[:n]]
        images = pixels_to_float(self.tensors()[0][rows])
        if self.captioned:  # a table of its own: the same seed draws the same captions
            return images, CaptionTable(self.captioned_images.captions, seed).index_select(0, rows)
        return images, self.tensors()[1][rows]

    def evaluator(self, options: EvalOptions | None = None) -> ImageEvaluator:
        """FD/KID/precision/recall/accuracy in the features of a classifier trained once on the
        training split (labelled data), Inception FID/KID with a weights file, bits/dim always."""
        from flowdiff.data.image_evaluation import folder_source

        evaluator = ImageEvaluator(folder_source(self), self.num_classes, options, self.class_names)
        if self.captioned:
            evaluator.prompts = self.held_out_captions
        return evaluator

    def held_out_captions(self, n: int) -> list[str]:
        """``n`` captions of held-out images (each image once while n allows), a fixed draw."""
        held_out = self.split()[1]
        order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))
        rows = held_out[order.repeat(-(-n // len(held_out)))[:n]]
        return CaptionTable(self.captioned_images.captions, 0).index_select(0, rows)


_ANNOUNCED: set[str] = set()


def announce(message: str) -> None:
    """Print ``message`` once a process (the CLI builds the datamodule twice)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(message, flush=True)
