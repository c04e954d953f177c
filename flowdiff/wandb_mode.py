"""Weights & Biases: online with credentials, offline without; never an interactive prompt."""

from __future__ import annotations

import netrc
import os


def has_wandb_credentials() -> bool:
    """``WANDB_API_KEY`` is set, or ``wandb login`` stored a key in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> str:
    """Set ``WANDB_MODE=offline`` unless a mode is set or credentials exist; return the mode."""
    if "WANDB_MODE" not in os.environ and not has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:  # every DDP rank started by torchrun or SLURM gets here
            print("flowdiff: no W&B credentials found, logging offline")  # news, not a problem
    return os.environ.get("WANDB_MODE", "online")


def print_sync_hint(logger) -> None:
    """After an offline run, print the command that uploads it."""
    if os.environ.get("WANDB_MODE") != "offline" or logger is None:
        return
    run = getattr(getattr(logger, "experiment", None), "dir", None)
    if run:
        run_dir = os.path.dirname(run.rstrip("/"))  # .../wandb/offline-run-*/files -> the run
        print(f"flowdiff: W&B run saved offline; upload it with: wandb sync {run_dir}")
