"""``flowdiff evaluate``: how good a trained model is, and what quality costs in steps and guidance.

One row per sampler (x steps x grid, or x tolerances) x guidance scale x guidance interval, each
with its NFE and wall time, against the fixed protocol
of the data's evaluator, with the data-against-data floor in the same table. Writes
``metrics.json`` and plots of quality against NFE and against guidance, logs them to W&B, and
splits the sampling across ranks when launched distributed (:mod:`flowdiff.evaluate.sharding`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from flowdiff.data.evaluators import NLL_SEED, EvalOptions
from flowdiff.evaluate.plan import Plan, make_plan
from flowdiff.evaluate.report import Report, Row
from flowdiff.evaluate.sharding import chunk_generator, make_fabric, map_chunks
from flowdiff.flags import comma_lists, plain
from flowdiff.inference import add_network_flags
from flowdiff.utils import UsageError

LIST_FLAGS = {"--sampler", "--steps", "--grid", "--atol", "--rtol", "--guidance", "--compare"}
PROTOCOL = "flowdiff evaluate v1"


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
        help="Samples a row (default: the data's: 5000 points, 1000 images).",
    )
    add(
        "--sampler",
        type=list[str] | None,
        default=None,
        help="Samplers: euler,heun,dopri5 (aliases, class names or class paths; default: the "
        "checkpoint's own, with its arguments).",
    )
    add(
        "--steps",
        type=list[PositiveInt] | None,
        default=None,
        help="Steps of the fixed-grid samplers: 10,20,50 (dopri5 has none: one row each).",
    )
    add(
        "--grid",
        type=list[str] | None,
        default=None,
        help="Time grids of the fixed-grid samplers: uniform,edm,shift:3 (edm:RHO, power:P).",
    )
    add("--atol", type=list[PositiveFloat] | None, default=None, help="dopri5: 1e-3,1e-5.")
    add("--rtol", type=list[PositiveFloat] | None, default=None, help="dopri5: 1e-3,1e-5.")
    add("--guidance", type=list[NonNegativeFloat] | None, default=None, help="CFG scales: 0,1,3.")
    add(
        "--guidance-interval",
        type=str,
        nargs="+",
        default=None,
        help="Guide only for a <= t <= b: 0.2,0.8 (several: 0,1 0.2,0.8; w = 1 rows take none).",
    )
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
        help="Data for the likelihood (default: 1000 points, 256 test images).",
    )
    add(
        "--nll-steps",
        type=PositiveInt | None,
        default=None,
        help="RK4 steps of the likelihood ODE (default 50; 4 NFE a step).",
    )
    add("--probes", type=PositiveInt, default=1, help="Hutchinson probes (images).")
    add(
        "--straightness",
        type=bool | None,
        default=None,
        help="Measure the straightness of the model's ODE trajectories (Euler, 100 steps; "
        "default: as the data's evaluator says: for points, not for images, where it costs as "
        "much as a 100-step row).",
    )
    add("--data-dir", type=str | None, default=None, help="Data directory (default: the run's).")
    add(
        "--classifier-cache",
        type=str | None,
        default=None,
        help="Where a feature classifier is kept (default: $FLOWDIFF_CACHE or ~/.cache/flowdiff).",
    )
    add(
        "--min-accuracy",
        type=NonNegativeFloat | None,
        default=None,
        help="Refuse a feature classifier below this held-out accuracy (default: 0.99 for "
        "MNIST, 0.9 for other labelled images).",
    )
    add(
        "--inception-weights",
        type=str | None,
        default=None,
        help="Inception-v3 weights: TorchScript, or torch-fidelity's pt_inception-2015-12-05 "
        "(needs torch-fidelity); adds Inception FID and KID.",
    )
    add(
        "--compare",
        type=list[str] | None,
        default=None,
        help="Earlier evaluations (metrics.json or their folders) to draw beside this one in "
        "the quality-against-NFE plot: runs/a/eval/x,runs/b/eval/y (same protocol).",
    )
    add("--wandb", type=bool, default=True, help="Log the table and plots to W&B.")
    add(
        "--accelerator",
        "--device",
        type=str,
        default="auto",
        help="auto (a CUDA GPU if any), cpu, cuda, gpu; --devices says how many.",
    )
    add_network_flags(add)
    add("--devices", type=int | str, default=1, help="Ranks on this node (launched by Fabric).")
    add("--num-nodes", type=PositiveInt, default=1, help="Nodes (torchrun or SLURM launch them).")
    return parser  # fmt: skip


def log(fabric, message: str) -> None:
    if fabric.global_rank == 0:
        print(f"flowdiff: {message}", file=sys.stderr, flush=True)


def draw(
    fabric, model, plan: Plan, sampler, guidance, interval, seed: int
) -> tuple[torch.Tensor, int]:
    """``plan.num_samples`` samples split across ranks, and the NFE of one trajectory: the largest
    any chunk used on any rank (an adaptive solver's chunks differ; ranks meet once, at the end)."""
    nfe = []

    def work(c, lo, hi):
        y = chunk_condition(model, plan.labels, lo, hi) if guidance is not None else None
        g = chunk_generator(seed, c)
        result = model.sample(
            hi - lo, sampler, y=y, guidance=guidance, generator=g, guidance_interval=interval
        )
        nfe.append(result.nfe)
        return result.x

    desc = sampler.label + (f" w={guidance:g}" if guidance is not None else "")
    samples = map_chunks(fabric, plan.num_samples, plan.batch_size, work, desc)
    most = torch.tensor(max(nfe, default=0), device=fabric.device)
    if fabric.world_size > 1:
        most = fabric.all_reduce(most, reduce_op="max")
    return samples, int(most)


def chunk_condition(model, labels, lo: int, hi: int):
    """The condition of rows ``lo..hi``: labels on the model's device, or captions encoded."""
    if model.reads_text:
        with torch.no_grad():
            return model.condition(labels[lo:hi])
    return labels[lo:hi].to(model.device)


def likelihood(fabric, model, evaluator, plan: Plan, probes: int) -> dict:
    """The data's likelihood under the model: the unconditional field when the model learned it
    (label dropout), else the field conditioned on the data's labels (``log p(x|y)``)."""
    from flowdiff.likelihood import log_likelihood
    from flowdiff.samplers import PowerGrid, RK4Sampler

    data = evaluator.likelihood_data(plan.nll_samples)
    if not model.conditional:
        labels, conditioning = None, "unconditional"
    elif model.reads_text:  # y=None is the null caption
        labels, conditioning = None, "unconditional (null caption)"
    elif model.p_uncond > 0:
        labels = torch.full((len(data.x),), model.net.num_classes)
        conditioning = "unconditional (null label)"
    else:
        labels, conditioning = data.y, "conditional on data labels"
    solver = RK4Sampler(plan.nll_steps, PowerGrid(data.grid_power))

    def work(c, lo, hi):
        y = labels[lo:hi].to(model.device) if labels is not None else None
        result = log_likelihood(
            model.field(y),
            data.x[lo:hi].to(model.device),
            solver=solver,
            divergence=data.divergence,
            probes=probes,
            generator=chunk_generator(NLL_SEED, c),
        )
        return result.log_prob

    log_p = map_chunks(fabric, len(data.x), plan.batch_size, work, "likelihood").double()
    values = data.convert(log_p)
    mean, sem = values.mean().item(), values.std().item() / len(values) ** 0.5
    prefix = f"{data.label} " if data.label else ""
    probe_text = f"; Hutchinson, {probes} Rademacher probe(s)" if data.divergence != "exact" else ""
    return {
        data.key: mean,
        f"{data.key}_sem": sem,
        "unit": data.unit,
        "summary": f"{prefix}{mean:.4f} ± {sem:.4f} {data.unit} ({conditioning}; "
        f"{data.description}; {solver!r}{probe_text})",
    }


STRAIGHTNESS_STEPS = 100


def measure_straightness(fabric, model, plan: Plan, seed: int) -> dict:
    """Rectified flow's straightness of the model's own ODE (:mod:`flowdiff.straightness`) from
    the rows' noise, conditioned on the plan's labels (w = 1) for a conditional model."""
    from flowdiff.straightness import straightness

    def work(c, lo, hi):
        y = chunk_condition(model, plan.labels, lo, hi) if model.conditional else None
        x_0 = model.noise(hi - lo, chunk_generator(seed, c))
        return straightness(model.field(y), x_0, model.path.t_min, 1.0, STRAIGHTNESS_STEPS)

    values = map_chunks(fabric, plan.num_samples, plan.batch_size, work, "straightness").double()
    mean, sem = values.mean().item(), values.std().item() / len(values) ** 0.5
    return {
        "straightness": mean,
        "straightness_sem": sem,
        "summary": f"{mean:.4g} ± {sem:.2g} (E ∫ ||(x_1 - x_0) - v(x_t, t)||^2 dt along the "
        f"model's ODE, Euler {STRAIGHTNESS_STEPS} steps, {plan.num_samples} samples)",
    }


def evaluate_main(argv: list[str]) -> Path | None:
    cfg = build_parser().parse_args(comma_lists(argv, LIST_FLAGS))
    cfg.guidance, cfg.steps = plain(cfg.guidance, float), plain(cfg.steps, int)
    from flowdiff.checkpoint import load_run
    from flowdiff.inference import InferenceNetwork, network_speed

    ckpt = Path(cfg.ckpt)
    compared = [Report.read(path) for path in cfg.compare or []]  # unreadable: refused now
    run = load_run(ckpt, data_dir=cfg.data_dir)
    model = run.model
    if run.datamodule is None:
        raise UsageError(f"{str(ckpt)!r} records no datamodule to evaluate against")
    options = EvalOptions(cfg.classifier_cache, cfg.inception_weights, cfg.min_accuracy)
    evaluator = run.datamodule.evaluator(options)
    evaluator.check()  # data present, weights files: no work yet
    plan = make_plan(cfg, model, evaluator, ckpt.resolve().parent.parent)
    protocol = {
        "checkpoint": str(ckpt),
        "protocol": PROTOCOL,
        "samples a row": plan.num_samples,
        "chunk (samples integrated at once)": plan.batch_size,
        "noise": f"chunk c drawn from seed {cfg.seed} * 1000003 + c",
    }
    for other in compared:  # what differs before the data's own protocol is known
        other.check_comparable(protocol)
    fabric = make_fabric(cfg.accelerator, cfg.devices, cfg.num_nodes)
    fabric.launch()
    rank0 = fabric.global_rank == 0
    if rank0:
        try:
            plan.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create output directory {str(plan.out)!r}: {err}") from err
        if not os.access(plan.out, os.W_OK):
            raise UsageError(f"output directory {str(plan.out)!r} is not writable")
        evaluator.prepare(plan.num_samples, lambda m: log(fabric, m))
    model.to(fabric.device)
    speed = network_speed(cfg.precision, cfg.compile, fabric.device)
    if rank0:
        print(speed.line())
    model.inference = InferenceNetwork(model.net, speed.precision, speed.compile)

    rows = []
    for i, (sampler, w, interval) in enumerate(plan.rows, 1):
        start = time.perf_counter()
        samples, nfe = draw(fabric, model, plan, sampler, w, interval, cfg.seed)
        seconds = time.perf_counter() - start
        labels = plan.labels if w is not None else None
        metrics = evaluator.score(samples, labels) if rank0 else {}
        rows.append(Row.of(sampler, w, interval, nfe, round(seconds, 3), metrics))
        scale = f", w = {w:g}" if w is not None else ""
        scale += f" for {interval[0]:g} <= t <= {interval[1]:g}" if interval else ""
        log(fabric, f"[{i}/{len(plan.rows)}] {sampler!r}{scale}: NFE {nfe}, "
            f"{plan.num_samples} samples in {seconds:.1f} s")  # fmt: skip
    nll = likelihood(fabric, model, evaluator, plan, cfg.probes) if cfg.nll else None
    straightness = cfg.straightness
    if straightness is None:
        straightness = evaluator.measures_straightness
    straight = measure_straightness(fabric, model, plan, cfg.seed) if straightness else None
    if not rank0:
        return None
    protocol["network precision"] = speed.precision + (", compiled" if speed.compile else "")
    protocol.update(evaluator.protocol(plan.num_samples))
    report = Report(protocol, evaluator.columns, rows, evaluator.floor, nll, straight)
    print(report.table())
    report.write(plan.out, report.comparable(compared))
    if cfg.wandb:
        report.log_wandb(plan.out, run_name=ckpt.resolve().parent.parent.name)
    print(f"flowdiff: wrote {plan.out / 'metrics.json'} and the plots beside it")
    return plan.out
