"""Run directories: everything a run writes goes under ``trainer.default_root_dir``.

The policy (never train over an earlier run unless resuming or told to overwrite; refuse a
directory that cannot be written, before any work), the checkpoint ``--ckpt_path last`` means,
the resolved config, and the W&B logger that writes there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback

from flowdiff.utils import UsageError


def check_run_dir(root: str, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse to train into a directory holding an earlier run, unless resuming or overwriting."""
    if (Path(root) / "config.yaml").exists() and ckpt_path is None and not overwrite:
        raise UsageError(
            f"run directory {root} already holds a run; resume it with --ckpt_path last, choose "
            f"another with --trainer.default_root_dir DIR, or pass --overwrite true to replace it"
        )


def check_writable(root: str) -> None:
    """Refuse a run directory that cannot be created or written, before any work starts."""
    existing = Path(root).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot create run directory {root}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write run directory {root}: {existing} is not writable")


def last_checkpoint(folder: str | os.PathLike) -> str | None:
    """The checkpoint ``--ckpt_path last`` resumes: Lightning's choice, the newest ``last*.ckpt``
    in the checkpoint folder (``last-v1.ckpt`` and the like too); None when there is none."""
    candidates = [p for p in Path(folder).glob("last*.ckpt") if p.is_file()]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def clear_run_dir(root: str) -> None:
    """With --overwrite: remove the earlier run's checkpoints and samples (after the config has
    been checked and every class built, so a bad config loses nothing)."""
    for name in ("checkpoints", "samples"):
        shutil.rmtree(Path(root) / name, ignore_errors=True)


class SaveFitConfig(SaveConfigCallback):
    """Write the resolved config into the run directory when training, and only then (a later
    `flowdiff validate` or `test` on the same run must not replace the training config)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def wandb_logger(save_dir: str):
    """W&B logger under the run directory: online with credentials, otherwise offline."""
    from lightning.pytorch.loggers import WandbLogger

    from flowdiff.wandb_mode import choose_wandb_mode

    class RunDirWandbLogger(WandbLogger):
        # The directory is made when the W&B run starts (after the data is found), not when the
        # trainer is built: a run refused before training leaves nothing behind.
        @property
        def experiment(self):
            os.makedirs(save_dir, exist_ok=True)
            return super().experiment

    choose_wandb_mode()
    return RunDirWandbLogger(save_dir=save_dir, project="flowdiff", name=Path(save_dir).name)
