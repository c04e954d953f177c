"""The data contract: what every flowdiff datamodule states and gives.

Only the data knows what kind of data it is. The module, the callbacks, ``sample`` and
``evaluate`` ask it (or the checkpoint's record of it, :meth:`FlowDataModule.describe`) and never
look at tensor ranks.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor

from flowdiff.config import class_path
from flowdiff.data.labels import LabelDropout
from flowdiff.utils import UsageError

if TYPE_CHECKING:
    from flowdiff.data.evaluators import EvalOptions, Evaluator


class FlowDataModule(L.LightningDataModule):
    """Base class of flowdiff's datamodules: batches ``(x, y)`` with x (B, *data_shape) and
    y (B,) integer labels (zeros when the data has none), or for captioned data a list of B
    captions (strings).

    A subclass calls ``save_hyperparameters()`` in its ``__init__`` (its arguments are how a
    checkpoint rebuilds it) and sets:

    - ``data_shape``: the shape of one sample, e.g. ``(2,)`` or ``(1, 28, 28)``;
    - ``num_classes``: the number of labels (0: unlabelled); ``class_names`` optionally;
    - ``captioned``: True when ``y`` is captions (and then :meth:`captions` lists the training
      captions, from which a text encoder builds its vocabulary or its cache);
    - ``p_uncond``: the label-dropout probability for classifier-free guidance;
    - ``stores_noise``: True when batches are ``(x, y, x_0)``, each sample with the noise it is
      paired with (reflow couplings, the ``stored`` coupling).

    and implements :meth:`reference` (held-out data, for the floor of the metrics) and
    :meth:`evaluator` (the metric suite that fits the data). Label (and caption) dropout is applied
    here, once, to training batches only.
    """

    data_shape: tuple[int, ...] = ()
    num_classes: int = 0
    class_names: list[str] | None = None
    p_uncond: float = 0.0
    captioned: bool = False  # y is a list of captions (strings), not labels
    stores_noise: bool = False  # batches are (x, y, x_0): the noise stored with each sample
    recorded: dict | None = None  # what a checkpoint recorded of this data (describe()), if any

    @property
    def conditioning(self) -> str:
        """What the data conditions on: ``none``, ``classes`` or ``text``."""
        return "text" if self.captioned else ("classes" if self.num_classes else "none")

    def captions(self) -> list[str]:
        """Every training caption (captioned data only), in a fixed order."""
        raise NotImplementedError(f"{type(self).__name__} has no captions")

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` held-out samples (in the model's value range) and their labels, chosen by
        ``seed``: the same seed gives the same data."""
        raise NotImplementedError

    def evaluator(self, options: EvalOptions | None = None) -> Evaluator:
        """The metric suite of this data (``flowdiff.data.evaluators``)."""
        raise NotImplementedError

    def class_frequencies(self) -> list[float] | None:
        """``p(y = k)`` for ``k < num_classes``: the share of each class in the training data,
        which a checkpoint records (:meth:`describe`) and ``flowdiff reflow`` draws a teacher's
        labels from; None for data without labels. The base counts :meth:`training_labels`."""
        if not self.num_classes:
            return None
        counts = torch.bincount(self.training_labels().long(), minlength=self.num_classes).double()
        return (counts / counts.sum()).tolist()

    def training_labels(self) -> Tensor:
        """The labels (N,) of the training samples, for :meth:`class_frequencies`."""
        raise NotImplementedError(
            f"{type(self).__name__} has labels: it implements training_labels() or "
            "class_frequencies()"
        )

    def network_sizes(self) -> dict:
        """The network arguments the data fixes: ``dim`` for points (D,), ``in_channels`` and
        ``image_size`` (S, or [H, W] when not square) for images (C, H, W)."""
        if len(self.data_shape) == 1:
            return {"dim": self.data_shape[0]}
        if len(self.data_shape) == 3:
            channels, height, width = self.data_shape
            size = height if height == width else [height, width]
            return {"in_channels": channels, "image_size": size}
        return {}

    def epoch_order(self) -> tuple[torch.Generator, tuple[int, int]]:
        """The training order of this epoch: a generator seeded by ``hparams.seed`` and the epoch
        (a fresh permutation every epoch, the same on every rank), and the ``(rank, world_size)``
        share each rank takes of it (:class:`flowdiff.data.batches.Batches`)."""
        epoch = self.trainer.current_epoch if self.trainer else 0
        shard = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return torch.Generator().manual_seed(self.hparams.seed + 7919 * epoch), shard

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training and self.p_uncond > 0:
            x, y, *stored = batch
            return x, self.label_dropout(y), *stored
        return batch

    @functools.cached_property
    def label_dropout(self) -> LabelDropout:
        return LabelDropout(self.p_uncond, self.num_classes)

    @property
    def hparams_initial(self) -> dict:
        """What the loggers get of the data: its arguments under ``data``. Lightning merges the
        module's and the data's hyperparameters into one flat dict and refuses a key with two
        values (a reflow file's ``path`` beside the module's probability ``path``)."""
        init_args = {k: v for k, v in super().hparams_initial.items() if not k.startswith("_")}
        return {"data": {"class_path": class_path(type(self)), "init_args": init_args}}

    def describe(self) -> dict:
        """What a checkpoint records of the data: how to rebuild it, and what it is."""
        init_args = {k: v for k, v in dict(self.hparams).items() if not k.startswith("_")}
        return {
            "class_path": class_path(type(self)),
            "init_args": init_args,
            "data_shape": list(self.data_shape),
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names) if self.class_names else None,
            "p_uncond": float(self.p_uncond),
            "conditioning": self.conditioning,
            "class_frequencies": self.class_frequencies(),
        }


def check_arguments(
    positive: dict | None = None,
    seed: int = 0,
    p_uncond: float = 0.0,
    fraction: dict | None = None,
) -> None:
    """Raise a UsageError naming the first bad datamodule argument: ``positive`` integers,
    ``seed`` (an integer >= 0), ``p_uncond`` (in [0, 1]), ``fraction``s (in (0, 1)); the dicts map
    an argument's name to its value."""
    for name, value in (positive or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"data.{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"data.seed must be an integer >= 0, got {seed!r}")
    if isinstance(p_uncond, bool) or not isinstance(p_uncond, (int, float)):
        raise UsageError(f"data.p_uncond must be a number in [0, 1], got {p_uncond!r}")
    if not 0.0 <= p_uncond <= 1.0:
        raise UsageError(f"data.p_uncond must be in [0, 1], got {p_uncond}")
    for name, value in (fraction or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"data.{name} must be a number in (0, 1), got {value!r}")
        if not 0.0 < value < 1.0:
            raise UsageError(f"data.{name} must be in (0, 1), got {value}")
