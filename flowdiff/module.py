"""The LightningModule: wires a network, a path and an objective. It holds no formula."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from flowdiff.fields import ModelField
from flowdiff.metrics import mmd, wasserstein2
from flowdiff.objectives import Objective
from flowdiff.paths import GaussianConditionalPath
from flowdiff.plots import image_grid, plot_image_grids, plot_points, save_figure
from flowdiff.samplers import Sampler, SampleResult
from flowdiff.utils import UsageError

# The learning-rate schedule is stepped every 10 optimizer steps: a scheduler step costs ~3% of a
# small model's step, and a rate constant over 10 steps changes nothing.
LR_UPDATE_EVERY = 10
# With ``nonfinite="skip"``, this many non-finite losses in a row stop training all the same: the
# model has diverged, and skipping forever would only hide it.
MAX_SKIPPED_IN_A_ROW = 100


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must read (a non-finite loss, weights or a checkpoint
    that cannot be written): the CLI prints it on one line and exits non-zero."""


class _SharedWhenCopied:
    """A callable that deep copies share instead of copying.

    EMA's averaged model is a deep copy of the module. Under LightningCLI the optimizer factory is
    a jsonargparse partial that reaches the CLI and its trainer (and under DDP the process group,
    which cannot be copied): the copy needs no optimizer, so it shares the factory.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


class FlowModule(L.LightningModule):
    """Flow matching / score matching on a Gaussian probability path.

    Args:
        net: ``forward(x, t, y=None) -> tensor shaped like x``.
        path: the Gaussian conditional probability path.
        objective: CFM or CSM; it says what the network predicts.
        sampler: how validation draws samples (and the default for ``flowdiff sample``).
        optimizer: optimizer factory (a class path in YAML); Adam by default.
        lr_schedule: ``constant``, or ``cosine``: decay the learning rate to 0 over the run's
            optimizer steps (``trainer.max_steps``, or the epochs' batches), so the last steps
            average the gradient noise out.
        data_shape: shape of one data point, e.g. ``[2]``; linked from the datamodule.
        num_classes: number of labels in the data (0: unlabelled); linked from the datamodule.
        gradient_clip_val: clip the gradients' global norm to this value (None: no clipping).
            The step is written out, so use this rather than ``trainer.gradient_clip_val``.
        nonfinite: what a non-finite (nan or inf) training loss does: ``stop`` training with an
            error naming the step, before its update (the weights and checkpoints stay finite), or
            ``skip`` the batch (no update; counted in ``train/skipped_batches``).
        log_every_n_steps: log the training loss every n steps (logging is not free on small nets);
            None (linked from an unset ``trainer.log_every_n_steps``): Lightning's default, 50.
        val_num_samples: samples drawn at each validation for metrics and pictures (points), or
            unconditional images in the validation grid.
        val_guidance: guidance scales of the validation grids of a conditional image model.
        val_per_class: images a class in those grids (one row per class).
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianConditionalPath,
        objective: Objective,
        sampler: Sampler,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        data_shape: list[int] | None = None,
        num_classes: int = 0,
        gradient_clip_val: float | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        log_every_n_steps: int | None = 50,
        val_num_samples: int = 2000,
        val_guidance: list[float] = [1.0, 3.0],  # noqa: B006 (jsonargparse needs the list)
        val_per_class: int = 4,
    ):
        super().__init__()
        # Under the CLI this stores the parsed config (class paths and arguments), which makes the
        # checkpoint self-describing: `flowdiff sample` rebuilds the model from it alone.
        self.save_hyperparameters()
        classes = getattr(net, "num_classes", 0)
        if classes and num_classes and classes != num_classes:
            raise UsageError(
                f"the network has {classes} classes but the data has {num_classes}; set "
                f"model.net.init_args.num_classes to {num_classes} (or 0 for no labels)"
            )
        self.net, self.path, self.objective, self.sampler = net, path, objective, sampler
        self.optimizer, self.lr_schedule = _SharedWhenCopied(optimizer), lr_schedule
        self.data_shape = list(data_shape) if data_shape is not None else None
        self.num_classes = num_classes
        self.gradient_clip_val = gradient_clip_val
        if nonfinite not in ("stop", "skip"):
            raise UsageError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.nonfinite, self.skipped_batches, self._skipped_in_a_row = nonfinite, 0, 0
        log_every_n_steps = 50 if log_every_n_steps is None else log_every_n_steps
        for name, value in (
            ("log_every_n_steps", log_every_n_steps),
            ("val_num_samples", val_num_samples),
            ("val_per_class", val_per_class),
        ):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"model.{name} must be a positive integer, got {value!r}")
        # The step is written out (manual optimization): Lightning's automatic loop costs ~80 us
        # a step, 3-4% of a small model's step on a CPU.
        self.automatic_optimization = False
        self.log_every_n_steps, self.val_num_samples = log_every_n_steps, val_num_samples
        self.val_guidance, self.val_per_class = list(val_guidance), val_per_class
        if self.data_shape is not None and len(self.data_shape) == 3:
            # Convolutions on a CPU run ~20% faster on NHWC than on NCHW tensors.
            self.net.to(memory_format=torch.channels_last)

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets `_current_fx_name` around every hook, ~30 times a step; nn.Module's
        # __setattr__ costs ~1.5 us each (it checks for parameters, buffers and modules).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def conditional(self) -> bool:
        """Whether the network takes labels (and so has a null label for guidance)."""
        return bool(getattr(self.net, "num_classes", 0))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)

    def loss(self, z: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if z.ndim == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        t = self.path.sample_time(z.shape[0], z.device, z.dtype, generator)
        eps = torch.empty_like(z).normal_(generator=generator)  # keeps z's memory format
        sample = self.path.sample(z, t, eps)
        output = self.net(sample.x_t, t, y if self.conditional else None)
        return self.objective(output, sample, self.path).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        z, y = batch
        optimizer = self.optimizers()
        loss = self.loss(z, y)
        if not self._finite(loss):
            return loss  # skipped: no backward, no update
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
        optimizer.step()
        step = self.global_step
        scheduler = self.lr_schedulers()
        if scheduler is not None and step % LR_UPDATE_EVERY == 0:
            scheduler.step()
        if step % self.log_every_n_steps == 0:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def _finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank; if not, stop or skip (``nonfinite``).

        Checked before the backward pass and the update, so a non-finite loss never reaches the
        weights. One host sync a step; under DDP the ranks agree, so all stop or skip together.
        """
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)))
        if finite:
            self._skipped_in_a_row = 0
            return True
        step = self.global_step + 1  # the optimizer step this batch was for, counted from 1
        if self.nonfinite == "skip" and self._skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
            self.skipped_batches += 1
            self._skipped_in_a_row += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            if self.skipped_batches == 1:
                print(
                    f"flowdiff: the loss is {loss.item()} at step {step}: batch skipped "
                    "(model.nonfinite=skip; later ones are counted in train/skipped_batches)",
                    file=sys.stderr,
                )
            return False
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = f"last checkpoint kept: {last}" if Path(last).is_file() else "no checkpoint yet"
        if self.nonfinite == "skip":
            raise TrainingError(
                f"training stopped: the loss is {loss.item()} at step {step}, after "
                f"{MAX_SKIPPED_IN_A_ROW} skipped batches in a row; {kept}. Lower the learning "
                "rate or set --model.gradient_clip_val"
            )
        raise TrainingError(
            f"training stopped: the loss is {loss.item()} at step {step} (stopped before its "
            f"update: the weights are those of step {step - 1}); {kept}. Lower the learning rate, "
            "set --model.gradient_clip_val, or pass --model.nonfinite skip to skip such batches"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_batches"] = self.skipped_batches

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_batches = int(checkpoint.get("skipped_batches", 0))

    def on_train_end(self) -> None:
        if self.skipped_batches and self.trainer.is_global_zero:
            print(f"flowdiff: skipped {self.skipped_batches} batches with a non-finite loss")

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        z, y = batch
        # A fixed generator: the validation loss is comparable from one epoch to the next.
        generator = torch.Generator(z.device).manual_seed(0)
        loss = self.loss(z, y, generator)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)  # mean over ranks

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # -- sampling -------------------------------------------------------------------------------

    def field(self, y: Tensor | None = None, guidance: float | None = None) -> ModelField:
        """The network as a field for the samplers, guided when labels and a scale are given."""
        null = self.net.num_classes if self.conditional else None
        return ModelField(self.net, self.path, self.objective.prediction, y, guidance, null)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: Sampler | None = None,
        y: Tensor | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> SampleResult:
        """Integrate from ``x_0 ~ N(0, I)`` at ``t_min`` to t = 1 with ``sampler``.

        ``batch_size`` splits the work into chunks (the noise is drawn at once, so the samples do
        not depend on it): a CPU runs a small U-Net ~2x faster on batches of ~250 images than on
        batches of 2,000, whose activations no longer fit in its caches. ``progress`` shows a
        progress bar over the chunks when stderr is a terminal.
        """
        sampler = sampler or self.sampler
        x_0 = torch.randn(num_samples, *self.data_shape, generator=generator, device="cpu")
        x_0 = x_0.to(self.device, self.dtype)
        if x_0.ndim == 4:
            x_0 = x_0.contiguous(memory_format=torch.channels_last)
        size = batch_size or num_samples
        results = []
        starts = range(0, num_samples, size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch", disable=not sys.stderr.isatty())
        for start in starts:
            y_chunk = y[start : start + size] if y is not None else None
            field = self.field(y_chunk, guidance)
            results.append(
                sampler.sample(
                    field,
                    x_0[start : start + size],
                    self.path.t_min,
                    1.0,
                    return_trajectory=return_trajectory,
                    generator=generator,
                )
            )
        if len(results) == 1:
            return results[0]
        trajectory = None
        if return_trajectory:
            trajectory = torch.cat([r.trajectory for r in results], dim=1)
        return SampleResult(torch.cat([r.x for r in results]), trajectory, results[0].nfe)

    # -- validation pictures and metrics --------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        self._evaluate_samples("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate_samples("test")

    def _evaluate_samples(self, stage: str) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if len(self.data_shape) == 3:
            self._image_grids(stage)
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "reference"):
            return
        generator = torch.Generator().manual_seed(1)
        result = self.sample(self.val_num_samples, generator=generator, return_trajectory=True)
        data, _ = datamodule.reference(self.val_num_samples, seed=12345)
        samples = result.x.float().cpu()
        metrics = {f"{stage}/w2": wasserstein2(samples, data), f"{stage}/mmd": mmd(samples, data)}
        self.log_dict(metrics, rank_zero_only=True)
        title = f"step {self.global_step}  W2 {metrics[f'{stage}/w2']:.3f}"
        self._save_picture(
            plot_points(samples, data, result.trajectory.float(), title=title), stage, "samples"
        )

    def _image_grids(self, stage: str) -> None:
        """A grid per guidance scale: one row per class (or unconditional samples)."""
        if self.conditional:
            classes = self.net.num_classes
            y = torch.arange(classes, device=self.device).repeat_interleave(self.val_per_class)
            scales: list[float | None] = list(self.val_guidance)
            per_row = self.val_per_class
        else:
            y, scales, per_row = None, [None], 8
        n = len(y) if y is not None else self.val_num_samples
        grids = {}
        for w in scales:
            generator = torch.Generator().manual_seed(1)
            x = self.sample(n, y=y, guidance=w, generator=generator, batch_size=128).x
            grids["" if w is None else f"w = {w:g}"] = image_grid(x, nrow=per_row)
        title = f"step {self.global_step}"
        self._save_picture(plot_image_grids(grids, title=title), stage, "samples")

    def _save_picture(self, fig, stage: str, key: str) -> None:
        out_dir = Path(self.trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / f"{stage}_step{self.global_step:07d}.png"
        save_figure(fig, png)
        log_image = getattr(self.logger, "log_image", None)
        if callable(log_image):
            log_image(key=f"{stage}/{key}", images=[str(png)], step=self.global_step)

    # -- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_schedule == "constant":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches) // LR_UPDATE_EVERY
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
