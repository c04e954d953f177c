"""Checkpoints: read as data, never as code; written atomically; rebuilt into a model alone.

- :func:`load_checkpoint_file` is the one ``torch.load`` of flowdiff (``weights_only=True``).
- :class:`SafeCheckpointIO` is the trainer's checkpoint I/O: it writes through a temporary file
  renamed over the old one (a crash never leaves a truncated ``last.ckpt``), refuses non-finite
  weights, and reads through :func:`load_checkpoint_file`, so ``--ckpt_path`` resumes safely too.
- :class:`RunCheckpoint` is Lightning's ``ModelCheckpoint`` whose ``save_last="link"`` replaces
  ``last.ckpt`` atomically as well.
- :func:`load_run` rebuilds the model (and its datamodule) from a checkpoint alone.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import instantiate_module
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flowdiff.config import build
from flowdiff.module import FlowModule
from flowdiff.nonfinite import TrainingError
from flowdiff.utils import UsageError, atomic_path


@dataclass
class LoadedRun:
    model: FlowModule
    datamodule: L.LightningDataModule | None
    checkpoint: dict


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so a checkpoint
    whose pickle would import or call anything is refused before it runs. One clear
    :class:`UsageError` for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        # weights_only=True ran no code; torch's unpickler meets a malformed file with any error
        # (UnpicklingError, EOFError, IndexError, KeyError, struct.error, UnicodeDecodeError...).
        # torch names the refused global: "Unsupported global: GLOBAL eval was not an allowed
        # global", or for a blocked module "unsupported GLOBAL posix.system whose module ...".
        text = str(err)
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if refused:
            raise UsageError(
                f"refusing checkpoint {str(path)!r}: loading it would run or import "
                f"{refused.group(1)}, and a checkpoint is data, never code (flowdiff loads "
                "checkpoints with weights_only=True)"
            ) from err
        if "Weights only load failed" in text:  # not torch's advice to load it as code
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            reason = detail.group(1).strip() if detail else "not tensors and plain containers"
            raise UsageError(
                f"cannot read checkpoint {str(path)!r}: corrupt, truncated or not a safe "
                f"PyTorch checkpoint (refused by weights_only=True: {reason})"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot read checkpoint {str(path)!r}: corrupt, truncated or not a safe "
            f"PyTorch checkpoint ({first})"
        ) from err


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``flowdiff fit``, loaded as data; one clear error otherwise."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict)")
    hparams = ckpt.get("hyper_parameters") or {}
    if not {"net", "path", "objective"} <= set(hparams) or "data" not in ckpt:
        raise UsageError(
            f"{str(path)!r} is not a self-describing flowdiff checkpoint (its hyperparameters do "
            "not name net, path and objective, or it records no data; it was not written by a "
            "flowdiff FlowModule of this version)"
        )
    return ckpt


def load_run(path: str | Path, data_dir: str | None = None) -> LoadedRun:
    """The model with the checkpoint's weights (the EMA weights when training used EMA), in eval
    mode, and the datamodule it was trained on (``data_dir`` replacing its own, if given)."""
    ckpt = read_checkpoint(path)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    try:
        with warnings.catch_warnings():
            # save_hyperparameters sees the rebuilt objects; the checkpoint keeps their config.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            model = instantiate_module(FlowModule, hparams)
        model.load_state_dict(ckpt["state_dict"])
        model.on_load_checkpoint(ckpt)
    except Exception as err:  # a checkpoint from another version or a damaged one
        raise UsageError(f"cannot rebuild the model from {str(path)!r}: {err}") from err
    model.eval()
    return LoadedRun(model, build_datamodule(ckpt["data"], data_dir), ckpt)


def build_datamodule(record: dict, data_dir: str | None = None) -> L.LightningDataModule | None:
    """The datamodule a checkpoint's data record describes (None when it names none)."""
    if not record.get("class_path"):
        if data_dir is not None:
            raise UsageError("--data-dir: this checkpoint names no datamodule")
        return None
    config = {"class_path": record["class_path"], "init_args": dict(record.get("init_args") or {})}
    if data_dir is not None:
        if "data_dir" not in config["init_args"]:
            raise UsageError(f"--data-dir: {record['class_path']} takes no data_dir")
        config["init_args"]["data_dir"] = data_dir
    try:
        datamodule = build(config)
        datamodule.recorded = record
        return datamodule
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"cannot rebuild the datamodule {record['class_path']}: {err}") from err


def check_finite_weights(checkpoint: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose weights (averaged or raw) hold a nan or an inf."""
    for part in ("state_dict", "current_model_state"):
        for name, value in (checkpoint.get(part) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                if not bool(torch.isfinite(value).all()):
                    raise TrainingError(
                        f"training stopped: the weights at step {checkpoint.get('global_step')} "
                        f"are not finite ({part}.{name}); {path} was not written, the checkpoints "
                        "written before are kept"
                    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, made safe both ways.

    Writing: ``torch.save`` to a temporary file beside the target, fsync, rename over the target
    (:func:`flowdiff.utils.atomic_path`): a crash or a full disk mid-write leaves the previous
    checkpoint byte for byte. Temporary files of the same target left by a killed process are
    removed first. Non-finite weights are refused (:class:`TrainingError`).

    Reading (``fit --ckpt_path ...``): :func:`load_checkpoint_file`, ``weights_only=True`` whatever
    the caller asks.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote: Lightning's own
            return super().save_checkpoint(checkpoint, path, storage_options)
        check_finite_weights(checkpoint, path)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
                stale.unlink(missing_ok=True)  # left by a process killed mid-write
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as err:
            raise TrainingError(
                f"cannot write checkpoint {path}: {err}; the previous one is kept"
            ) from err

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None):
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location or "cpu")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last="link"`` swaps ``last.ckpt`` atomically: the link (or,
    where links are not allowed, the copy) is made under a temporary name and renamed over the old
    one, so ``last.ckpt`` never disappears or holds half a file."""

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            with atomic_path(linkpath) as tmp:
                tmp.unlink()
                try:
                    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                except OSError:
                    shutil.copy(filepath, tmp)
        trainer.strategy.barrier()

    @property
    def state_key(self) -> str:
        # Lightning labels every hook call of every callback with its state key (for its
        # profiler), and ModelCheckpoint's is a repr of its settings: ~10 reprs a training step,
        # ~1% of a toy step. The same settings give the same key; it is kept until they change.
        settings = (self.monitor, self.mode, self._every_n_train_steps, self._every_n_epochs,
                    self._train_time_interval)  # fmt: skip
        cached = getattr(self, "_state_key_cache", None)
        if cached is None or cached[0] != settings:
            cached = self._state_key_cache = (settings, super().state_key)
        return cached[1]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A run resumed in another directory (moved or copied) is that directory's run now: its
        # last.ckpt is the one to replace. Lightning forgets last_model_path when the directory
        # changed, and would write last-v1.ckpt beside a stale last.ckpt, the one that the next
        # --ckpt_path last would resume from.
        super().load_state_dict(state_dict)
        last = os.path.join(self.dirpath or "", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if self.dirpath and not self.last_model_path and os.path.lexists(last):
            self.last_model_path = last

    # Lightning (2.6) writes last.ckpt at a validation or an epoch end only when a top-k checkpoint
    # was written there too, and when training ends only if it never wrote one before. flowdiff
    # keeps no top-k checkpoint (save_top_k=0): without these, last.ckpt would appear only when
    # training ends (a run killed after an hour would leave nothing to resume), or, once written,
    # would miss the steps after the last validation (a run stopped by max_time).
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_now(trainer)

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
