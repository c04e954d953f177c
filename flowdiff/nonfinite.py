"""The non-finite guard: no update from a nan or inf loss ever reaches the weights or a checkpoint.

On a CPU the loss is read on the host every optimizer step (it costs nothing there). On a GPU a
host read waits for the whole step to finish and stalls the pipeline, so the decision is taken on
the device: a flag each step makes the optimizer leave the weights and its state as they were,
and the host reads the flags only at the logging interval, before every checkpoint, at
validation and at the end of training, where it stops or reports exactly as the per-step check
would have (the same step named, the same checkpoint kept).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from flowdiff.utils import UsageError

# Pending device flags read at the latest after this many optimizer steps (one host read).
MAX_PENDING = 1000


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must read (a non-finite loss, weights or a checkpoint
    that cannot be written): the CLI prints it on one line and exits non-zero."""


class NonFiniteGuard(Callback):
    """What a non-finite (nan or inf) training loss does.

    ``stop``: training stops with an error naming the step, before its update (the weights and
    checkpoints stay finite). ``skip``: the update is skipped (the optimizer leaves every weight
    and its state as they were; the step still counts in ``trainer.global_step``), counted in
    ``train/skipped_batches``; ``max_skipped`` skips in a row stop training all the same. Under
    DDP the ranks agree, so all stop or skip together.

    Args:
        action: ``stop`` or ``skip``.
        max_skipped: non-finite losses in a row that stop training even with ``skip``.
        check_every_step: read the loss on the host every optimizer step (None: on a CPU, where
            that is free). Otherwise the skip is decided on the device (fused Adam/AdamW, the
            configs' optimizer, skip through their ``found_inf`` input at no cost; other
            optimizers, and 16-mixed's gradient scaler, through a copy of the weights and the
            optimizer state taken before the step and put back after a skipped one), and the host
            reads the flags at the logging interval and before every checkpoint. With ``stop``
            every update after the bad step is skipped too, so the weights stay those of the step
            before it until the host stops training.
    """

    def __init__(
        self,
        action: Literal["stop", "skip"] = "stop",
        max_skipped: int = 100,
        check_every_step: bool | None = None,
    ):
        if action not in ("stop", "skip"):
            raise UsageError(f"nonfinite.action must be 'stop' or 'skip', got {action!r}")
        if max_skipped < 1:
            raise UsageError(f"nonfinite.max_skipped must be >= 1, got {max_skipped}")
        self.action, self.max_skipped, self.check_every_step = action, max_skipped, check_every_step
        self.skipped, self.in_a_row, self.logged = 0, 0, 0
        self._trainer = None
        self._bad, self._loss = None, None  # this step's flag and loss (device tensors)
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (step, bad, loss), not read yet
        self._halt = self._in_a_row_t = None  # device: no update from now on; skips in a row
        self._skip = None  # device: skip the coming optimizer step
        self._snapshot: list[Tensor] | None = None
        self._hooks: list = []
        self._on_host = True  # read the loss every step (decided at the start of training)

    # -- the decision, shared by both checks ------------------------------------------------------

    def _observe(self, trainer, step: int, bad: bool, loss: float) -> bool:
        """Account for optimizer step ``step`` (counted from 1): whether its update is skipped.
        Raises :class:`TrainingError` when training must stop."""
        if not bad:
            self.in_a_row = 0
            return False
        if self.action == "skip" and self.in_a_row < self.max_skipped:
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            if self.skipped == 1:
                print(f"flowdiff: the loss is {loss} at step {step}: batch skipped "
                      "(nonfinite.action=skip; later ones are counted in train/skipped_batches)",
                      file=sys.stderr)  # fmt: skip
            return True
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = f"last checkpoint kept: {last}" if Path(last).is_file() else "no checkpoint yet"
        if self.action == "skip":
            raise TrainingError(
                f"training stopped: the loss is {loss} at step {step}, after {self.max_skipped} "
                f"skipped batches in a row; {kept}. Lower the learning rate or set "
                "--trainer.gradient_clip_val"
            )
        raise TrainingError(
            f"training stopped: the loss is {loss} at step {step} (stopped before its update: the "
            f"weights are those of step {step - 1}); {kept}. Lower the learning rate, set "
            "--trainer.gradient_clip_val, or pass --nonfinite.action skip to skip such batches"
        )

    def _every_step(self, pl_module) -> bool:
        if self.check_every_step is not None:
            return self.check_every_step
        return pl_module.device.type == "cpu"

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self._on_host = self._every_step(pl_module)
        if self._on_host:
            return
        device = pl_module.device
        self._halt = torch.zeros((), dtype=torch.bool, device=device)
        self._in_a_row_t = torch.full((), self.in_a_row, dtype=torch.int64, device=device)
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        loss = loss.detach()
        nonfinite = ~torch.isfinite(loss)
        if self._bad is None:  # the first micro-batch of an optimizer step
            self._bad, self._loss = nonfinite, loss
        else:
            self._loss = torch.where(nonfinite & ~self._bad, loss, self._loss)
            self._bad = self._bad | nonfinite

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad, loss, self._bad, self._loss = self._bad, self._loss, None, None
        step = trainer.global_step + 1  # the optimizer step this batch was for, counted from 1
        if bad is None:  # no backward (manual optimization): nothing to check
            return
        if trainer.world_size > 1:  # the ranks agree (a sum on the device, no host read)
            bad = trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if self._on_host:
            bad_now = bool(bad)
            if self._observe(trainer, step, bad_now, float(loss) if bad_now else 0.0):
                optimizer.zero_grad(set_to_none=True)  # parameters without a gradient do not move
                pl_module.log("train/skipped_batches", float(self.skipped))
            return
        # On the device: the same rule as _observe, with no host read.
        if self.action == "stop":
            self._halt = self._halt | bad
        else:
            self._in_a_row_t = (self._in_a_row_t + 1) * bad
            self._halt = self._halt | (self._in_a_row_t > self.max_skipped)
        self._skip = bad | self._halt
        self._pending.append((step, bad, loss))
        self._before_step(trainer, optimizer)
        if len(self._pending) >= MAX_PENDING:
            self._flush()

    def _before_step(self, trainer, optimizer) -> None:
        fused = all(group.get("fused") for group in optimizer.param_groups)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if fused and scaler is None and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            # Fused Adam/AdamW take GradScaler's found_inf: a nonzero value skips the update and
            # keeps the step count, on the device.
            optimizer.found_inf = self._skip.float()
            return
        tensors = [p for group in optimizer.param_groups for p in group["params"]]
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        self._snapshot = [(t, t.detach().clone()) for t in tensors]

    def _after_step(self, optimizer, args, kwargs) -> None:
        if getattr(optimizer, "found_inf", None) is not None:
            del optimizer.found_inf
        if self._snapshot is not None:
            with torch.no_grad():
                for t, before in self._snapshot:
                    t.copy_(torch.where(self._skip, before, t))
            self._snapshot = None

    def _flush(self) -> None:
        """Read the pending device flags (one host read) and act on them as the per-step check
        would have, in order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = [torch.stack([bad.double(), loss.double()]) for _, bad, loss in pending]
        for (step, _, _), (bad, loss) in zip(pending, torch.stack(flags).tolist(), strict=True):
            self._observe(self._trainer, step, bad > 0, loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pending and trainer.global_step % trainer.log_every_n_steps == 0:
            self._flush()
        if self.skipped != self.logged and not self._on_host:
            self.logged = self.skipped
            pl_module.log("train/skipped_batches", float(self.skipped))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._flush()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._flush()

    def state_dict(self) -> dict:
        self._flush()  # before every checkpoint: the count is exact, a stop stops the save
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = self.logged = int(state_dict.get("skipped", 0))

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.skipped and trainer.is_global_zero:
            print(f"flowdiff: skipped {self.skipped} batches with a non-finite loss")
