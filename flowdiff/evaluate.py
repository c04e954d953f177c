"""``flowdiff evaluate``: how good a trained model is, and what quality costs in steps and guidance.

One row per sampler x steps x guidance scale, each with its NFE and wall time, against a fixed,
printed protocol (``flowdiff.metrics.suites``): the same reference data, seeds and sample counts for
every run, and the data-against-data floor in the same table. Writes ``metrics.json`` and plots of
quality against NFE and against guidance, logs them to W&B, and splits the sampling across ranks
when launched distributed (Lightning Fabric): sample chunk ``c`` always uses the noise of seed
``(seed, c)``, so the results do not depend on the number of ranks.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from flowdiff.metrics.report import Report, Row
from flowdiff.sample import parse_list
from flowdiff.samplers import SAMPLERS, get_sampler
from flowdiff.utils import UsageError

OUTPUTS = ("metrics.json", "quality_vs_nfe.png", "quality_vs_guidance.png")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="flowdiff evaluate",
        description="Metrics of a checkpoint over sampler x steps x guidance, against a fixed "
        "protocol, with the data floor (no --config needed).",
        exit_on_error=False,
    )
    add = parser.add_argument
    add("--ckpt", type=str, required=True, help="Checkpoint written by flowdiff fit.")
    add(
        "--num-samples",
        type=PositiveInt | None,
        default=None,
        help="Samples a row (default: 5000 points, 1000 images); the floor uses as many.",
    )
    add("--sampler", type=str | None, default=None, help="One or several: euler,heun.")
    add("--steps", type=str | None, default=None, help="Steps, one or several: 10,20,50,100.")
    add("--guidance", type=str | None, default=None, help="CFG scales, e.g. 0,1,3,5.")
    add("--seed", type=int, default=0, help="Seed of the sampling noise (data seeds are fixed).")
    add("--out", type=str | None, default=None, help="Output directory (default: <run>/eval/...).")
    add("--overwrite", type=bool, default=False, help="Replace the files of an existing output.")
    add(
        "--batch-size",
        type=PositiveInt | None,
        default=None,
        help="Samples a chunk (default: 1000 points, 128 images); part of the protocol.",
    )
    add("--nll", type=bool, default=True, help="Compute the likelihood (NLL or bits/dim).")
    add(
        "--nll-samples",
        type=PositiveInt | None,
        default=None,
        help="Data points for the likelihood (default: 1000 points, 256 test images).",
    )
    add(
        "--nll-steps",
        type=PositiveInt | None,
        default=None,
        help="RK4 steps of the likelihood ODE (default: 50 points, 50 images; 4 NFE a step).",
    )
    add("--probes", type=PositiveInt, default=1, help="Hutchinson probes (images).")
    add("--data-dir", type=str | None, default=None, help="MNIST directory (default: the run's).")
    add(
        "--classifier-cache",
        type=str | None,
        default=None,
        help="Where the MNIST feature classifier is kept (default: $FLOWDIFF_CACHE or "
        "~/.cache/flowdiff).",
    )
    add(
        "--inception-weights",
        type=str | None,
        default=None,
        help="Local FID Inception weights (pt_inception-2015-12-05): adds Inception FID.",
    )
    add("--wandb", type=bool, default=True, help="Log the table and plots to W&B.")
    add("--accelerator", type=str, default="cpu", help="cpu, cuda, gpu, auto.")
    add("--devices", type=int | str, default=1, help="Ranks on this node (launched by Fabric).")
    add("--num-nodes", type=PositiveInt, default=1, help="Nodes (torchrun or SLURM launch them).")
    return parser


@dataclass
class Plan:
    """Everything a run of ``evaluate`` will do, checked before any long work starts."""

    samplers: list[str]
    steps: list[int]
    guidance: list[float | None]
    num_samples: int
    batch_size: int
    nll_samples: int
    out: Path
    labels: torch.Tensor | None = field(default=None, repr=False)


def make_plan(cfg, model, run_dir: Path) -> Plan:
    """Parse and check the sweep; every problem is a UsageError before any sampling."""
    is_image = len(model.data_shape) == 3
    samplers = cfg.sampler.split(",") if cfg.sampler else [model.sampler.name]
    samplers = [s.strip() for s in samplers if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown or not samplers:
        raise UsageError(f"unknown sampler {unknown or cfg.sampler!r}; expected {sorted(SAMPLERS)}")
    steps = parse_list(cfg.steps, int, "steps") if cfg.steps else [model.sampler.steps]
    if any(s < 1 for s in steps):
        raise UsageError(f"--steps must be positive integers, got {cfg.steps}")
    if cfg.guidance is not None:
        if not model.conditional:
            raise UsageError(
                "this model was trained without labels: --guidance needs a model whose network "
                "has a label embedding (num_classes > 0)"
            )
        guidance = parse_list(cfg.guidance, float, "guidance")
        if any(w < 0 for w in guidance):
            raise UsageError(f"guidance scales must be >= 0, got {cfg.guidance}")
    else:
        guidance = list(model.val_guidance) if model.conditional else [None]
    num_samples = cfg.num_samples or (1000 if is_image else 5000)
    batch_size = cfg.batch_size or (128 if is_image else 1000)
    labels = None
    if model.conditional:  # balanced: sample i asks for class i mod K
        labels = torch.arange(num_samples) % model.net.num_classes
    out = Path(cfg.out) if cfg.out else run_dir / "eval" / f"seed{cfg.seed}"
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite true or choose --out DIR")
    nll_samples = cfg.nll_samples or (256 if is_image else 1000)
    return Plan(samplers, steps, guidance, num_samples, batch_size, nll_samples, out, labels)


# -- sampling split across ranks ------------------------------------------------------------------


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The generator of chunk ``chunk``: its noise is the same whichever rank draws it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + chunk)


def map_chunks(fabric, n: int, size: int, work, desc: str = "") -> torch.Tensor:
    """``work(c, lo, hi) -> (hi - lo, ...)`` for each chunk ``c`` of ``range(n)`` in chunks of
    ``size``, the chunks dealt round-robin to the ranks and gathered in order on every rank.
    Rank 0 shows a progress bar over its chunks when stderr is a terminal."""
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


def draw(fabric, model, plan: Plan, sampler, guidance, seed: int) -> tuple[torch.Tensor, int]:
    """``plan.num_samples`` samples (labels ``plan.labels``) split across ranks, and the NFE of
    one trajectory."""
    nfe = []

    def work(c, lo, hi):
        y = plan.labels[lo:hi].to(model.device) if guidance is not None else None
        g = chunk_generator(seed, c)
        result = model.sample(hi - lo, sampler, y=y, guidance=guidance, generator=g)
        nfe.append(result.nfe)
        return result.x

    desc = f"{sampler.name} {sampler.steps} steps" + (
        f" w={guidance:g}" if guidance is not None else ""
    )
    samples = map_chunks(fabric, plan.num_samples, plan.batch_size, work, desc)
    return samples, nfe[0] if nfe else 0


# -- the command ----------------------------------------------------------------------------------


def make_fabric(cfg):
    from lightning.fabric import Fabric

    devices = cfg.devices
    if "LOCAL_WORLD_SIZE" in os.environ and devices == 1:  # launched by torchrun
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
    distributed = cfg.num_nodes > 1 or (devices not in (1, "1", "auto"))
    try:
        return Fabric(
            accelerator=cfg.accelerator,
            devices=devices,
            num_nodes=cfg.num_nodes,
            strategy="ddp" if distributed else "auto",
            precision="32-true",
        )
    except (ValueError, RuntimeError, TypeError) as err:
        raise UsageError(f"cannot set up {cfg.accelerator} x {devices}: {err}") from err


def log(fabric, message: str) -> None:
    if fabric.global_rank == 0:
        print(f"flowdiff: {message}", file=sys.stderr, flush=True)


def evaluate_main(argv: list[str]) -> Path | None:
    cfg = build_parser().parse_args(argv)
    from flowdiff.checkpoint import load_run
    from flowdiff.metrics.suites import make_suite

    ckpt = Path(cfg.ckpt)
    run = load_run(ckpt)
    model = run.model
    plan = make_plan(cfg, model, ckpt.resolve().parent.parent)
    suite = make_suite(run, plan, cfg)  # checks data, weights files, classifier cache: no work yet
    fabric = make_fabric(cfg)
    fabric.launch()
    rank0 = fabric.global_rank == 0
    if rank0:
        try:
            plan.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create output directory {str(plan.out)!r}: {err}") from err
        if not os.access(plan.out, os.W_OK):
            raise UsageError(f"output directory {str(plan.out)!r} is not writable")
    model.to(fabric.device)
    suite.prepare(fabric, log=lambda m: log(fabric, m))  # reference data, classifier, floor

    rows = []
    configs = [(s, n, w) for s in plan.samplers for n in plan.steps for w in plan.guidance]
    for i, (name, steps, w) in enumerate(configs, 1):
        sampler = get_sampler(name, steps)
        start = time.perf_counter()
        samples, nfe = draw(fabric, model, plan, sampler, w, cfg.seed)
        seconds = time.perf_counter() - start
        metrics = suite.score(samples, plan.labels if w is not None else None) if rank0 else {}
        rows.append(Row(name, steps, w, nfe, round(seconds, 3), metrics))
        scale = f", w = {w:g}" if w is not None else ""
        log(
            fabric,
            f"[{i}/{len(configs)}] {name} {steps} steps{scale}: NFE {nfe}, "
            f"{plan.num_samples} samples in {seconds:.1f} s",
        )
    likelihood = suite.likelihood(fabric, model, cfg, plan) if cfg.nll else None
    if not rank0:
        return None
    report = Report(suite.protocol(cfg, plan, ckpt), suite.columns, rows, suite.floor, likelihood)
    print(report.table())
    report.write(plan.out)
    if cfg.wandb:
        report.log_wandb(plan.out, run_name=ckpt.resolve().parent.parent.name)
    print(f"flowdiff: wrote {plan.out / 'metrics.json'} and the plots beside it")
    return plan.out
