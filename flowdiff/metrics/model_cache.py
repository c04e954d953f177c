"""The disk cache of the evaluation's trained networks (the feature classifiers, the image-text
contrastive model): one file a protocol, named by its hash, read back only when the saved
protocol is the same."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flowdiff.utils import UsageError


def cache_path(cache_dir: str | Path, protocol: dict, name: str = "mnist-classifier") -> Path:
    key = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}-{key}.pt"


def read_cached(path: Path, protocol: dict, make: Callable[[], nn.Module], log, what: str):
    """``(model, saved)``: the network cached at ``path`` for ``protocol`` (built by ``make``,
    in eval mode) and the saved dict; None when there is none or it cannot be read (said through
    ``log``: a damaged cache file costs a retraining, nothing more)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("protocol") != protocol:
            raise ValueError("its protocol differs from this one")
        model = make()
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved
    except Exception as err:
        log(f"{what} {path} unreadable ({type(err).__name__}: {err}); retraining")
        return None


def check_writable(folder: Path, what: str) -> None:
    """A UsageError unless ``folder`` can be created and written: said before training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the {what} {str(folder)!r}: {err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the {what} {str(folder)!r}")
