"""The couplings ``(x_0, x_1)`` that ``flowdiff reflow`` writes, as training data (rectified flow).

A reflow file is a tensor-pairs file (:mod:`flowdiff.data.pairs`) with the teacher's samples as
``x``, the noise each came from as ``x_0``, labels ``y`` for a conditional teacher, and under
``teacher`` a record of where they came from, including the teacher's own data record. Batches are
``(x_1, y, x_0)``; the ``stored`` coupling (``--model.coupling stored``) trains on the pairs as
they are. The metrics compare against the teacher's data (its reference and evaluator), never
against the teacher's samples.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.config import build
from flowdiff.data.batches import Batches
from flowdiff.data.evaluators import EvalOptions, Evaluator
from flowdiff.data.pairs import TensorPairsDataModule
from flowdiff.utils import UsageError


def read_reflow(path: str) -> dict:
    """The content of a reflow file (memory-mapped), or a UsageError naming what is missing."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UsageError(f"data.path {path!r}: cannot read it ({type(err).__name__})") from err
    if not isinstance(content, dict) or "x_0" not in content or "teacher" not in content:
        raise UsageError(f"data.path {path!r} is not a flowdiff reflow output (no x_0, teacher)")
    if tuple(content["x_0"].shape) != tuple(content["x"].shape):
        raise UsageError(f"data.path {path!r}: x_0 and x differ in shape")
    return content


class ReflowDataModule(TensorPairsDataModule):
    """Batches ``(x_1, y, x_0)`` of a ``flowdiff reflow`` output (the module docstring).

    Args: those of :class:`flowdiff.data.pairs.TensorPairsDataModule`; ``path`` is the ``.pt``
    file ``flowdiff reflow --out`` wrote.
    """

    stores_noise = True

    def __init__(
        self,
        path: str | None = None,
        p_uncond: float = 0.1,
        batch_size: int = 256,
        val_fraction: float = 0.01,
        seed: int = 0,
    ):
        if path is None:
            raise UsageError("data.path is required: the .pt file flowdiff reflow wrote")
        content = read_reflow(str(path))
        super().__init__(path, p_uncond, batch_size, val_fraction, seed)
        self.x_0 = content["x_0"]
        self.teacher = dict(content["teacher"])

    @functools.cached_property
    def teacher_data(self):
        """The teacher's datamodule (its reference and metrics), or None when it recorded none."""
        record = self.teacher.get("data") or {}
        if not record.get("class_path"):
            return None
        config = {"class_path": record["class_path"], "init_args": record.get("init_args") or {}}
        try:
            return build(config)
        except Exception as err:
            name = record["class_path"]
            raise UsageError(f"cannot rebuild the teacher's data {name}: {err}") from err

    def _loader(self, rows: Tensor, generator=None, shard=(0, 1)) -> DataLoader:
        batches = Batches(
            self.x, self.y, self.hparams.batch_size, generator, *shard, rows,
            convert=self._convert, noise=self.x_0,
        )  # fmt: skip
        return DataLoader(batches, batch_size=None)

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """The teacher's held-out data (the teacher's samples when it recorded no data)."""
        if self.teacher_data is None:
            return super().reference(n, seed)
        return self.teacher_data.reference(n, seed)

    def evaluator(self, options: EvalOptions | None = None) -> Evaluator:
        """The teacher's data's metric suite: the student is scored against the real data."""
        if self.teacher_data is None:
            return super().evaluator(options)
        return self.teacher_data.evaluator(options)
