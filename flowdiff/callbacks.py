"""Training callbacks: EMA of the weights, validation samples; the non-finite guard is
:mod:`flowdiff.nonfinite`."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch import Tensor

from flowdiff.nonfinite import NonFiniteGuard, TrainingError
from flowdiff.plots import save_figure
from flowdiff.utils import UsageError

__all__ = [
    "EMA", "NonFiniteGuard", "Throughput", "TrainingError", "ValidationSamples", "ema_decay"
]  # fmt: skip


def ema_decay(decay: float, warmup: float, num_averaged: int) -> float:
    """EMA decay after ``n = num_averaged`` updates: ``min(decay, (1 + n) / (warmup + n))``.

    The warm-up keeps the average from holding on to the first, nearly random, weights: with a
    fixed decay of 0.999, 1,100 updates still weigh the first iterate by ``0.999^1100 = 1/3``;
    with the warm-up the weight of early iterates falls like ``1/n^(warmup - 1)``.
    """
    return min(decay, (1.0 + num_averaged) / (warmup + num_averaged))


class EMA(WeightAveraging):
    """Exponential moving average of the weights, on Lightning's ``WeightAveraging``.

    Validation, checkpoints (``state_dict``) and the model after ``fit`` hold the averaged weights;
    the raw weights are kept in the checkpoint under ``current_model_state`` so training resumes
    exactly. The update is one fused ``lerp`` over all parameters.

    Args:
        decay: the EMA decay once warmed up.
        warmup: the decay after n updates is ``min(decay, (1 + n) / (warmup + n))``; 0 disables it.
        update_every_n_steps: update the average every n optimizer steps.
    """

    def __init__(self, decay: float = 0.999, warmup: float = 10.0, update_every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise UsageError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise UsageError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps

        self._tensors, self._count = None, None  # built at the first update of each fit

        @torch.no_grad()
        def multi_avg_fn(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
            self._lerp(ema, current, int(num_averaged))

        super().__init__(use_buffers=False, multi_avg_fn=multi_avg_fn)

    def _lerp(self, ema: list[Tensor], current: list[Tensor], n: int) -> None:
        d = ema_decay(self.decay, self.warmup, n) if self.warmup > 0 else self.decay
        torch._foreach_lerp_(ema, current, 1.0 - d)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._tensors, self._count = None, None  # a resumed fit may have loaded another count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning's, with the update below in place of AveragedModel.update_parameters.
        step = trainer.global_step
        if step > self._latest_update_step and self.should_update(step_idx=step - 1):
            self._update(pl_module)
            self._latest_update_step = step

    @torch.no_grad()
    def _update(self, pl_module) -> None:
        """``AveragedModel.update_parameters`` (``use_buffers=False``), value for value, with the
        tensor lists built once and the update count kept on the host too: Lightning's regroups
        the tensors and reads the count back from the device at every update (0.12 ms an update
        of the toy MLP on a CPU, against 0.014 ms here; tests/test_nets_callbacks.py)."""
        average = self._average_model
        if self._tensors is None:
            ema, current = list(average.module.parameters()), list(pl_module.parameters())
            buffers = list(average.module.buffers()), list(pl_module.buffers())
            if any(a.device != c.device for a, c in zip(ema, current, strict=True)):
                average.update_parameters(pl_module)  # an average kept on another device
                return
            self._tensors, self._count = (ema, current, *buffers), int(average.n_averaged)
        ema, current, ema_buffers, buffers = self._tensors
        if self._count == 0:
            torch._foreach_copy_(ema, current)
        else:
            self._lerp(ema, current, self._count)
        if buffers:  # not averaged: kept equal to the model's
            torch._foreach_copy_(ema_buffers, buffers)
        average.n_averaged.add_(1)
        self._count += 1


class Throughput(Callback):
    """Training samples a second (images/s, points/s), logged as ``train/samples_per_sec`` at the
    logging interval: the wall time of the interval's batches, validation excluded.

    Unlike Lightning's ``ThroughputMonitor`` it never synchronizes the GPU: over an interval the
    host runs at the device's pace (it waits whenever the launch queue is full), so the rate is
    the device's without stalling it each batch.
    """

    def __init__(self):
        self._start, self._samples, self._step = None, 0, -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start, self._samples, self._step = time.perf_counter(), 0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._samples += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if step != self._step and step % trainer.log_every_n_steps == 0:
            rate = self._samples / (time.perf_counter() - self._start)
            pl_module.log("train/samples_per_sec", rate, rank_zero_only=True)
            self._start, self._samples, self._step = time.perf_counter(), 0, step

    def on_validation_end(self, trainer, pl_module) -> None:
        self._start = None  # the next interval starts with the next training batch


class ValidationSamples(Callback):
    """At each validation (and test): samples, the data's cheap metrics and a picture.

    An unconditional model draws ``num_samples`` samples (with trajectories where the data shows
    them); a conditional one draws them for the data's labels at each scale of ``guidance`` (scales
    other than 1 only when the model learned the unconditional field). The picture is written to
    ``<run>/samples/<stage>_step<N>.png`` and logged to W&B.

    Args:
        num_samples: samples a picture (None: the data's choice, e.g. 2000 points or 8 images a
            class).
        guidance: guidance scales of a conditional model's pictures (default: 1 and 3 when the
            data has label dropout, else 1; other scales without it are refused).
        prompts: what a text model's pictures ask for, one row each (default: the first four
            distinct training captions); W&B gets them as the picture's caption.
    """

    def __init__(
        self,
        num_samples: int | None = None,
        guidance: list[float] | None = None,
        prompts: list[str] | None = None,
    ):
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise UsageError(
                f"validation.num_samples must be a positive integer, got {num_samples!r}"
            )
        if guidance is not None and any(w < 0 for w in guidance):
            raise UsageError(f"validation.guidance scales must be >= 0, got {guidance}")
        if prompts is not None and (not prompts or not all(p.strip() for p in prompts)):
            raise UsageError(f"validation.prompts must be non-empty strings, got {prompts!r}")
        self.num_samples = num_samples
        self.guidance = list(guidance) if guidance is not None else None
        self.prompts = list(prompts) if prompts is not None else None

    def check(self, model, datamodule) -> None:
        """Refuse guidance scales the model cannot honour, before training starts."""
        p_uncond = float(getattr(datamodule, "p_uncond", 0.0))
        if self.guidance and any(w != 1.0 for w in self.guidance) and not p_uncond > 0:
            raise UsageError(
                f"validation.guidance {self.guidance}: scales other than 1 need the unconditional "
                f"field, and this data has p_uncond = {p_uncond} (no label dropout); set "
                "--data.init_args.p_uncond 0.1 or --validation.guidance [1]"
            )

    def scales(self, model) -> list[float]:
        """The given scales, or 1 and 3 when the model learned the unconditional field, else 1."""
        if self.guidance is not None:
            return self.guidance
        return [1.0, 3.0] if model.p_uncond > 0 else [1.0]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._draw(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._draw(trainer, pl_module, "test")

    def _draw(self, trainer, pl_module, stage: str) -> None:
        evaluator_of = getattr(trainer.datamodule, "evaluator", None)
        if trainer.sanity_checking or not trainer.is_global_zero or evaluator_of is None:
            return
        evaluator = evaluator_of()
        n = self.num_samples or evaluator.validation_samples(pl_module.num_classes)
        size = evaluator.chunk_size  # samples integrated at once: 128 images, 1000 points
        panels, trajectory, metrics, names = {}, None, {}, None
        if pl_module.reads_text:
            names = self.prompts or list(dict.fromkeys(trainer.datamodule.captions()))[:4]
            per_prompt = evaluator.per_class or max(n // len(names), 1)
            y, index = pl_module.encode_prompts(names, per_prompt)
            for w in self.scales(pl_module):
                x = pl_module.sample(len(index), y=y, guidance=w, generator=_seeded(1),
                                     batch_size=size).x  # fmt: skip
                panels[f"w = {w:g}"] = (x.float().cpu(), index)
        elif pl_module.conditional:
            y = evaluator.labels(n).to(pl_module.device)
            for w in self.scales(pl_module):
                x = pl_module.sample(n, y=y, guidance=w, generator=_seeded(1), batch_size=size).x
                panels[f"w = {w:g}"] = (x.float().cpu(), y.cpu())
        else:
            result = pl_module.sample(
                n, generator=_seeded(1), return_trajectory=evaluator.trajectories, batch_size=size
            )
            panels[""] = (result.x.float().cpu(), None)
            trajectory = result.trajectory.float().cpu() if result.trajectory is not None else None
            metrics = evaluator.validation_metrics(panels[""][0])
        if metrics:
            pl_module.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, rank_zero_only=True)
        title = f"step {trainer.global_step}" + (
            f"  W2 {metrics['w2']:.3f}" if "w2" in metrics else ""
        )
        fig = evaluator.figure(panels, trajectory, title, names)
        out_dir = Path(trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / f"{stage}_step{trainer.global_step:07d}.png"
        save_figure(fig, png)
        log_image = getattr(pl_module.logger, "log_image", None)
        if callable(log_image):
            caption = {"caption": ["; ".join(names)]} if names else {}
            log_image(
                key=f"{stage}/samples", images=[str(png)], step=trainer.global_step, **caption
            )


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
