"""Work split across ranks (Lightning Fabric): chunks dealt round-robin, gathered in order.

Sample chunk ``c`` always uses the noise of seed ``(seed, c)``, so results do not depend on the
number of ranks.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from flowdiff.utils import UsageError


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The generator of chunk ``chunk``: its noise is the same whichever rank draws it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + chunk)


def map_chunks(fabric, n: int, size: int, work, desc: str = "") -> torch.Tensor:
    """``work(c, lo, hi) -> (hi - lo, ...)`` for each chunk ``c`` of ``range(n)`` in chunks of
    ``size``, the chunks dealt round-robin to the ranks and gathered in order on every rank.
    Rank 0 shows a progress bar over its chunks when stderr is a terminal.

    Ranks may do different amounts of work inside a chunk (an adaptive solver); they meet only in
    the collectives at the end, which every rank reaches once.
    """
    from tqdm import tqdm

    chunks = math.ceil(n / size)
    rank, world = fabric.global_rank, fabric.world_size
    slots = math.ceil(chunks / world)
    parts: list[torch.Tensor | None] = [None] * slots
    mine = range(rank, chunks, world)
    quiet = rank != 0 or not sys.stderr.isatty()
    for j, c in enumerate(tqdm(mine, desc=desc, unit="chunk", disable=quiet, leave=False)):
        lo, hi = c * size, min(n, (c + 1) * size)
        parts[j] = work(c, lo, hi).detach().float().cpu()
    if world == 1:
        return torch.cat([p for p in parts if p is not None])
    # Every rank sends (slots, size, ...) padded with zeros: all_gather needs equal shapes. Rank 0
    # always has chunk 0, and so the shape of one result.
    shape = fabric.broadcast(parts[0].shape[1:] if parts[0] is not None else None, src=0)
    buffer = torch.zeros(slots, size, *shape)
    for j, p in enumerate(parts):
        if p is not None:
            buffer[j, : len(p)] = p
    gathered = fabric.all_gather(buffer.to(fabric.device)).cpu()  # (world, slots, size, ...)
    ordered = [
        gathered[c % world, c // world, : min(n, (c + 1) * size) - c * size] for c in range(chunks)
    ]
    return torch.cat(ordered)


def make_fabric(accelerator: str, devices: int | str, num_nodes: int):
    """Lightning Fabric for ``devices`` ranks a node (torchrun's LOCAL_WORLD_SIZE when launched
    by it); DDP when there is more than one rank."""
    from lightning.fabric import Fabric

    if "LOCAL_WORLD_SIZE" in os.environ and devices == 1:  # launched by torchrun
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
    distributed = num_nodes > 1 or (devices not in (1, "1", "auto"))
    try:
        return Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy="ddp" if distributed else "auto",
            precision="32-true",
        )
    except (ValueError, RuntimeError, TypeError) as err:
        raise UsageError(f"cannot set up {accelerator} x {devices}: {err}") from err
