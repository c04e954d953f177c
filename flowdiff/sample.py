"""``flowdiff sample``: draw samples from a checkpoint; write a tensor file and a PNG."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from flowdiff.samplers import SAMPLERS, get_sampler
from flowdiff.utils import UsageError, atomic_path


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="flowdiff sample",
        description="Draw samples from a checkpoint (no --config needed).",
        exit_on_error=False,
    )
    add = parser.add_argument
    add("--ckpt", type=str, required=True, help="Checkpoint written by flowdiff fit.")
    add("--num-samples", type=PositiveInt, default=2000, help="Number of unconditional samples.")
    add(
        "--steps",
        type=PositiveInt | None,
        default=None,
        help="Integration steps (default: the training config's sampler).",
    )
    add(
        "--sampler",
        type=str | None,
        default=None,
        help=f"One of {', '.join(sorted(SAMPLERS))} (default: the config's).",
    )
    add("--sigma", type=NonNegativeFloat, default=1.0, help="Diffusion scale of euler-maruyama.")
    add(
        "--sigma-schedule",
        type=str,
        default="beta",
        help="euler-maruyama: 'beta' (sigma_t = sigma beta_t) or 'constant'.",
    )
    add(
        "--guidance",
        type=str | None,
        default=None,
        help="Classifier-free guidance scale w, or several: 1,3,5 (one grid per scale).",
    )
    add(
        "--labels",
        type=str | None,
        default=None,
        help="Labels to sample, e.g. 0,1,2 (default with --guidance: every class).",
    )
    add(
        "--per-class",
        type=PositiveInt | None,
        default=None,
        help="Samples per label (default: 8 for images, num-samples / labels for points).",
    )
    add("--seed", type=int, default=0, help="Seed of the initial noise (the same for every scale).")
    add(
        "--out",
        type=str | None,
        default=None,
        help="Output directory (default: <run>/samples/<sampler>-<steps>steps-seed<seed>).",
    )
    add("--overwrite", type=bool, default=False, help="Replace the files of an existing output.")
    add("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    add(
        "--batch-size",
        type=PositiveInt | None,
        default=None,
        help="Samples integrated at once (default: 128 images, or all points).",
    )
    return parser


def parse_list(text: str, kind: type, name: str) -> list:
    """``"1,3,5"`` -> ``[1.0, 3.0, 5.0]``, with one clear error for anything else."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--{name} expects comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"--{name} is empty")
    return values


def plan_labels(cfg, model, is_image: bool) -> tuple[torch.Tensor | None, list, int]:
    """The labels to condition on (None: unconditional), the guidance scales and samples a row."""
    guidance = parse_list(cfg.guidance, float, "guidance") if cfg.guidance is not None else None
    labels = parse_list(cfg.labels, int, "labels") if cfg.labels is not None else None
    if guidance is None and labels is None:
        return None, [None], cfg.num_samples
    if not model.conditional:
        raise UsageError(
            "this model was trained without labels: --guidance and --labels need a model "
            "whose network has a label embedding (num_classes > 0)"
        )
    if guidance is not None and any(w < 0 for w in guidance):
        raise UsageError(f"guidance scales must be >= 0, got {cfg.guidance}")
    num_classes = model.net.num_classes
    labels = labels if labels is not None else list(range(num_classes))
    bad = [k for k in labels if not 0 <= k < num_classes]
    if bad:
        raise UsageError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    per_class = cfg.per_class or (8 if is_image else max(cfg.num_samples // len(labels), 1))
    y = torch.tensor(labels).repeat_interleave(per_class)
    return y, guidance or [1.0], per_class


def sample_main(argv: list[str]) -> Path:
    cfg = build_parser().parse_args(argv)
    from flowdiff.checkpoint import load_run

    ckpt_path = Path(cfg.ckpt)
    run = load_run(ckpt_path)
    model = run.model
    is_image = len(model.data_shape) == 3
    name = cfg.sampler or model.sampler.name
    steps = cfg.steps or model.sampler.steps
    extra = {}
    if name == "euler-maruyama":
        extra = {"sigma": cfg.sigma, "sigma_schedule": cfg.sigma_schedule}
    sampler = get_sampler(name, steps, **extra)
    y, scales, per_row = plan_labels(cfg, model, is_image)

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
    if not os.access(out, os.W_OK | os.X_OK):  # said now, not after sampling
        raise UsageError(f"cannot write to output directory {str(out)!r}: permission denied")

    model.to(torch.device(cfg.device))
    n = len(y) if y is not None else cfg.num_samples
    results, start = [], time.perf_counter()
    for w in scales:
        # The same initial noise for every scale, so the grids compare point by point.
        generator = torch.Generator().manual_seed(cfg.seed)
        y_dev = y.to(model.device) if y is not None else None
        results.append(
            model.sample(
                n,
                sampler,
                y=y_dev,
                guidance=w,
                generator=generator,
                return_trajectory=not is_image and y is None,
                batch_size=cfg.batch_size or (128 if is_image else None),
                progress=True,
            )
        )
    seconds = time.perf_counter() - start
    samples = torch.stack([r.x.float().cpu() for r in results])
    payload = {
        "samples": samples[0] if y is None else samples,
        "labels": y,
        "guidance": scales if y is not None else None,
        "nfe": results[0].nfe,
        "sampler": repr(sampler),
        "seed": cfg.seed,
        "checkpoint": str(ckpt_path),
    }
    # Each file appears whole; the samples only once the picture is written (an existing pair
    # stays as it was if either fails).
    from flowdiff.plots import save_figure

    title = f"{sampler.name}, {steps} steps (NFE {results[0].nfe})"
    fig = make_picture(run, results, samples, y, scales, per_row, is_image, title)
    try:
        with atomic_path(files["samples"]) as pt:
            torch.save(payload, pt)
            save_figure(fig, files["picture"])
    except OSError as err:
        raise UsageError(f"cannot write the samples to {str(out)!r}: {err}") from err
    what = f"{n} samples" + (f" x {len(scales)} guidance scales" if len(scales) > 1 else "")
    print(f"flowdiff: {what} in {seconds:.2f} s ({sampler!r}, NFE {results[0].nfe})")
    print(f"flowdiff: wrote {files['samples']} and {files['picture']}")
    return out


def make_picture(run, results, samples, y, scales, per_row, is_image, title):
    from flowdiff.plots import image_grid, plot_image_grids, plot_labelled_points, plot_points

    names = [f"w = {w:g}" if w is not None else "" for w in scales]
    if is_image:
        grids = {name: image_grid(s, nrow=per_row) for name, s in zip(names, samples, strict=True)}
        fig = plot_image_grids(grids, title=title)
    else:
        data = None
        if run.datamodule is not None and hasattr(run.datamodule, "reference"):
            data, _ = run.datamodule.reference(samples.shape[1], seed=12345)
        if y is None:
            fig = plot_points(samples[0], data, results[0].trajectory.float().cpu(), title=title)
        else:
            panels = {name: (s, y) for name, s in zip(names, samples, strict=True)}
            fig = plot_labelled_points(panels, data, title=title)
    return fig
