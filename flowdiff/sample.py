"""``flowdiff sample``: draw samples from a checkpoint; write a tensor file and a PNG."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from flowdiff.samplers import SAMPLERS, get_sampler
from flowdiff.utils import UsageError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="flowdiff sample",
        description="Draw samples from a checkpoint (no --config needed).",
        exit_on_error=False,
    )
    parser.add_argument(
        "--ckpt", type=str, required=True, help="Checkpoint written by flowdiff fit."
    )
    parser.add_argument("--num-samples", type=PositiveInt, default=2000, help="Number of samples.")
    parser.add_argument(
        "--steps",
        type=PositiveInt | None,
        default=None,
        help="Integration steps (default: the training config's sampler).",
    )
    parser.add_argument(
        "--sampler",
        type=str | None,
        default=None,
        help=f"One of {', '.join(sorted(SAMPLERS))} (default: the config's).",
    )
    parser.add_argument(
        "--sigma", type=NonNegativeFloat, default=1.0, help="Diffusion scale of euler-maruyama."
    )
    parser.add_argument(
        "--sigma-schedule",
        type=str,
        default="beta",
        help="euler-maruyama: 'beta' (sigma_t = sigma beta_t) or 'constant'.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise.")
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="Output directory (default: <run>/samples/<sampler>-<steps>-seed<seed>).",
    )
    parser.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="Replace the files of an existing output directory.",
    )
    parser.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def sample_main(argv: list[str]) -> Path:
    cfg = build_parser().parse_args(argv)
    from flowdiff.checkpoint import load_run

    ckpt_path = Path(cfg.ckpt)
    run = load_run(ckpt_path)
    model = run.model
    default = model.sampler
    name = cfg.sampler or default.name
    steps = cfg.steps or default.steps
    extra = {}
    if name == "euler-maruyama":
        extra = {"sigma": cfg.sigma, "sigma_schedule": cfg.sigma_schedule}
    sampler = get_sampler(name, steps, **extra)

    out = (
        Path(cfg.out)
        if cfg.out
        else (ckpt_path.resolve().parent.parent / "samples" / f"{name}-{steps}steps-seed{cfg.seed}")
    )
    files = {"samples": out / "samples.pt", "picture": out / "samples.png"}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite true or choose --out DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output directory {str(out)!r}: {err.strerror}") from err

    device = torch.device(cfg.device)
    model.to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    result = model.sample(cfg.num_samples, sampler, generator=generator, return_trajectory=True)
    seconds = time.perf_counter() - start
    samples = result.x.float().cpu()
    torch.save(
        {
            "samples": samples,
            "nfe": result.nfe,
            "sampler": repr(sampler),
            "seed": cfg.seed,
            "checkpoint": str(ckpt_path),
        },
        files["samples"],
    )

    from flowdiff.plots import plot_points, save_figure

    data = None
    if run.datamodule is not None and hasattr(run.datamodule, "reference"):
        data, _ = run.datamodule.reference(cfg.num_samples, seed=12345)
    title = f"{sampler.name}, {steps} steps (NFE {result.nfe})"
    save_figure(
        plot_points(samples, data, result.trajectory.float().cpu(), title=title), files["picture"]
    )
    print(f"flowdiff: {cfg.num_samples} samples in {seconds:.2f} s ({sampler!r}, NFE {result.nfe})")
    print(f"flowdiff: wrote {files['samples']} and {files['picture']}")
    return out
