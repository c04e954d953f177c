"""``flowdiff sample``: draw samples from a checkpoint; write a tensor file and a PNG."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from flowdiff.flags import (
    check_guidance,
    check_interval_use,
    check_samplers,
    comma_lists,
    parse_intervals,
    plain,
    resolve_labels,
)
from flowdiff.inference import add_network_flags
from flowdiff.samplers import parse_grid, with_args
from flowdiff.utils import UsageError, atomic_path

LIST_FLAGS = {"--guidance", "--labels"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="flowdiff sample",
        description="Draw samples from a checkpoint (no --config needed). The sampler is the "
        "checkpoint's own, with all its arguments; the flags below override them.",
        exit_on_error=False,
    )
    add = parser.add_argument
    add("--ckpt", type=str, required=True, help="Checkpoint written by flowdiff fit.")
    add(
        "--num-samples",
        type=PositiveInt | None,
        default=None,
        help="Number of unconditional samples (default 2000), or of samples per prompt "
        "(default: 8 for images).",
    )
    add(
        "--prompt",
        type=list[str] | None,
        default=None,
        help="A text model's prompt; repeat the flag for several (one grid row each).",
    )
    add("--prompts-file", type=str | None, default=None, help="A file of prompts, one a line.")
    add(
        "--sampler",
        type=str | None,
        default=None,
        help="Another sampler: euler, heun, midpoint, rk4, euler-maruyama, dopri5 (adaptive), a "
        "class name or a class path (default: the checkpoint's).",
    )
    add(
        "--steps",
        type=PositiveInt | None,
        default=None,
        help="Integration steps (fixed-grid samplers; dopri5 has none).",
    )
    add(
        "--grid",
        type=str | None,
        default=None,
        help="Time grid of a fixed-grid sampler: uniform, edm (edm:RHO), shift:S, power:P.",
    )
    add("--atol", type=PositiveFloat | None, default=None, help="dopri5: absolute tolerance.")
    add("--rtol", type=PositiveFloat | None, default=None, help="dopri5: relative tolerance.")
    add("--sigma", type=NonNegativeFloat | None, default=None, help="Diffusion scale (SDE).")
    add(
        "--sigma-schedule",
        type=Literal["beta", "constant"] | None,
        default=None,
        help="SDE: 'beta' (sigma_t = sigma beta_t) or 'constant'.",
    )
    add(
        "--guidance",
        type=list[NonNegativeFloat] | None,
        default=None,
        help="Classifier-free guidance scale w, or several: 1,3,5 (one grid per scale).",
    )
    add(
        "--guidance-interval",
        type=str | None,
        default=None,
        help="Guide only for flow times a <= t <= b, e.g. 0.2,0.8 (w = 1 elsewhere).",
    )
    add(
        "--labels",
        type=list[int | str] | None,
        default=None,
        help="Classes to sample, by name or index: cat,dog or 0,1,2 (default with --guidance: "
        "every class).",
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
    add("--device", type=str, default="auto", help="auto (a CUDA GPU if any), cpu, cuda:1...")
    add_network_flags(add)
    add(
        "--batch-size",
        type=PositiveInt | None,
        default=None,
        help="Samples integrated at once (default: the data's: 128 images, 1000 points).",
    )
    return parser  # fmt: skip


DEFAULT_SAMPLES = 2000


def plan_labels(cfg, model, evaluator) -> tuple[torch.Tensor | None, list]:
    """The labels to condition on (None: unconditional) and the guidance scales."""
    check_guidance(model, cfg.guidance, cfg.labels)
    if cfg.guidance is None and cfg.labels is None:
        return None, [None]
    labels = cfg.labels if cfg.labels is not None else list(range(model.net.num_classes))
    num_samples = cfg.num_samples or DEFAULT_SAMPLES
    per_class = cfg.per_class or evaluator.per_class or max(num_samples // len(labels), 1)
    return torch.tensor(labels).repeat_interleave(per_class), list(cfg.guidance or [1.0])


def read_prompts(cfg, model) -> list[str] | None:
    """The prompts of ``--prompt`` and ``--prompts-file``, in that order (None: none given);
    one line for a prompt the model cannot take, a warning for what it reads imperfectly."""
    if model.reads_text and cfg.labels is not None:
        raise UsageError("--labels: this model conditions on text; use --prompt TEXT instead")
    prompts = list(cfg.prompt or [])
    if cfg.prompts_file is not None:
        try:
            lines = Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(
                f"--prompts-file {cfg.prompts_file!r}: cannot read it ({err})"
            ) from err
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {cfg.prompts_file!r} holds no prompt")
    if not prompts and cfg.prompt is None and cfg.prompts_file is None:
        if model.reads_text and cfg.guidance is not None:
            raise UsageError("guidance on a text model needs prompts: pass --prompt TEXT")
        return None
    if not model.reads_text:
        fix = "use --labels with class names or indices" if model.conditional else "drop it"
        raise UsageError(f"--prompt: this model was not trained on captions; {fix}")
    if any(not p.strip() for p in prompts):
        raise UsageError("--prompt: an empty prompt (the null caption is guidance w = 0)")
    check_guidance(model, cfg.guidance)
    for warning in model.text_encoder.prompt_warnings(prompts):
        print(f"flowdiff: warning: {warning}", file=sys.stderr)
    return prompts


def split_prompts(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``--prompt TEXT`` (or ``--prompt=TEXT``) may be repeated: the prompts, and the rest."""
    rest, prompts = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--prompt":
            value = next(args, None)
            if value is None:
                raise UsageError("--prompt needs a text")
            prompts.append(value)
        elif arg.startswith("--prompt="):
            prompts.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, (prompts or None)


def sample_main(argv: list[str]) -> Path:
    argv, prompts = split_prompts(argv)
    cfg = build_parser().parse_args(comma_lists(argv, LIST_FLAGS))
    cfg.prompt = prompts
    cfg.guidance = plain(cfg.guidance, float)
    grid = parse_grid(cfg.grid) if cfg.grid is not None else None
    interval = (parse_intervals(cfg.guidance_interval) or [None])[0]
    atol, rtol = (None if v is None else float(v) for v in (cfg.atol, cfg.rtol))
    from flowdiff.checkpoint import load_run
    from flowdiff.inference import InferenceNetwork, network_speed, resolve_device

    device = resolve_device(cfg.device)
    ckpt_path = Path(cfg.ckpt)
    run = load_run(ckpt_path)
    model = run.model
    cfg.labels = resolve_labels(cfg.labels, run.checkpoint["data"].get("class_names"))
    sampler = with_args(
        model.sampler, cfg.sampler, steps=cfg.steps, sigma=cfg.sigma,
        sigma_schedule=cfg.sigma_schedule, grid=grid, atol=atol, rtol=rtol,
    )  # fmt: skip
    check_samplers(model, [sampler])
    if run.datamodule is None:
        raise UsageError(f"{str(ckpt_path)!r} records no datamodule (nothing says what to draw)")
    evaluator = run.datamodule.evaluator()
    prompts = read_prompts(cfg, model)
    y, scales = plan_labels(cfg, model, evaluator) if prompts is None else (None, None)
    check_interval_use(cfg.guidance_interval, cfg.guidance is not None)

    default = ckpt_path.resolve().parent.parent / "samples" / f"{sampler.label}-seed{cfg.seed}"
    out = Path(cfg.out) if cfg.out else default
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

    model.to(device)
    names = None  # what each label asks for: prompts
    if prompts is not None:
        per_prompt = cfg.num_samples or cfg.per_class or evaluator.per_class or DEFAULT_SAMPLES
        y, index = model.encode_prompts(prompts, per_prompt)
        scales, names = list(cfg.guidance or [1.0]), prompts
    speed = network_speed(cfg.precision, cfg.compile, device)
    print(speed.line())
    precision = speed.precision
    model.inference = InferenceNetwork(model.net, precision, speed.compile)
    n = len(y) if y is not None else (cfg.num_samples or DEFAULT_SAMPLES)
    trajectory = evaluator.trajectories and y is None
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
                return_trajectory=trajectory,
                batch_size=cfg.batch_size or evaluator.chunk_size,
                progress=True,
                guidance_interval=interval,
            )  # fmt: skip
        )
    seconds = time.perf_counter() - start
    samples = torch.stack([r.x.float().cpu() for r in results])
    nfe = max(r.nfe for r in results)
    payload = {
        "samples": samples[0] if y is None else samples,
        "labels": y if names is None else None,
        "prompts": [prompts[i] for i in index] if names is not None else None,
        "guidance": scales if y is not None else None,
        "guidance_interval": list(interval) if interval is not None else None,
        "nfe": nfe,
        "sampler": repr(sampler),
        "seed": cfg.seed,
        "checkpoint": str(ckpt_path),
        "device": str(device),
        "precision": precision,
        "compile": speed.compile,
    }
    panel_names = [f"w = {w:g}" if w is not None else "" for w in scales]
    rows = index if prompts is not None else y
    panels = {name: (s, rows) for name, s in zip(panel_names, samples, strict=True)}
    path = results[0].trajectory.float().cpu() if trajectory else None
    limited = f", guided for {interval[0]:g} <= t <= {interval[1]:g}" if interval else ""
    fig = evaluator.figure(panels, path, title=f"{sampler!r} (NFE {nfe}{limited})", names=names)
    # Each file appears whole; the samples only once the picture is written (an existing pair
    # stays as it was if either fails).
    from flowdiff.plots import save_figure

    try:
        with atomic_path(files["samples"]) as pt:
            torch.save(payload, pt)
            save_figure(fig, files["picture"])
    except OSError as err:
        raise UsageError(f"cannot write the samples to {str(out)!r}: {err}") from err
    what = f"{n} samples" + (f" x {len(scales)} guidance scales" if len(scales) > 1 else "")
    print(f"flowdiff: {what} in {seconds:.2f} s ({sampler!r}, NFE {nfe}; {device}, {precision}"
          + (", compiled)" if speed.compile else ")"))  # fmt: skip
    print(f"flowdiff: wrote {files['samples']} and {files['picture']}")
    return out
