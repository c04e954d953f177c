"""Rebuild a model (and its data) from a checkpoint alone, loaded as data, never as code."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_module

from flowdiff.module import FlowModule
from flowdiff.utils import UsageError


@dataclass
class LoadedRun:
    model: FlowModule
    datamodule: L.LightningDataModule | None
    checkpoint: dict


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(..., weights_only=True)`` with one clear error for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
    ) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot read checkpoint {str(path)!r}: corrupt, truncated or not a safe "
            f"PyTorch checkpoint ({first})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict)")
    hparams = ckpt.get("hyper_parameters") or {}
    if not {"net", "path", "objective", "sampler"} <= set(hparams):
        raise UsageError(
            f"{str(path)!r} is not a self-describing flowdiff checkpoint (it was not written by "
            "`flowdiff fit`: its hyperparameters do not name net, path, objective and sampler)"
        )
    return ckpt


def load_run(path: str | Path) -> LoadedRun:
    """The model with the checkpoint's weights (the EMA weights when training used EMA), in eval
    mode, and its datamodule when the checkpoint describes one."""
    ckpt = read_checkpoint(path)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    try:
        with warnings.catch_warnings():
            # save_hyperparameters sees the rebuilt objects; the checkpoint keeps their config.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            model = instantiate_module(FlowModule, hparams)
        model.load_state_dict(ckpt["state_dict"])
    except Exception as err:  # a checkpoint from another version or a damaged one
        raise UsageError(f"cannot rebuild the model from {str(path)!r}: {err}") from err
    model.eval()
    datamodule = None
    dm_hparams = ckpt.get("datamodule_hyper_parameters")
    if dm_hparams and "_class_path" in dm_hparams:
        dm_hparams = {k: v for k, v in dm_hparams.items() if k != "_instantiator"}
        datamodule = instantiate_module(L.LightningDataModule, dm_hparams)
    return LoadedRun(model, datamodule, ckpt)
