"""``flowdiff reflow``: the couplings ``(x_0, x_1)`` of a teacher's ODE, for rectified flow.

Rectified flow (Liu et al. 2022, "Flow Straight and Fast"): integrate the teacher from noise
``x_0`` to ``x_1``, then train a student on the pairs as they are (``--model.coupling stored``
with :class:`flowdiff.data.reflow.ReflowDataModule`). Its paths cross less than the independent
coupling's, so it needs fewer steps. The coupling is the ODE's only when ``x_1`` is a function of
``x_0``: a sampler that draws fresh noise (an SDE) is refused. A conditional teacher's labels are
drawn from the data's class frequencies (its checkpoint's record of the data), so the student's
null branch learns the data's marginal, not a reweighted one.

The work is split into chunks of ``--batch-size`` pairs, chunk ``c`` drawn from the noise of seed
``(seed, c)`` (as ``flowdiff evaluate`` does: :func:`flowdiff.evaluate.sharding.chunk_generator`),
and dealt round-robin to the ranks. Each finished chunk is written at once into ``OUT.parts/``
beside a manifest of the settings; a run that is killed and started again with the same settings
keeps the finished chunks and draws only the others. When all are there, rank 0 writes ``OUT``
(one file) and removes ``OUT.parts/``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from flowdiff.evaluate.sharding import chunk_generator, make_fabric
from flowdiff.flags import check_guidance, check_samplers
from flowdiff.inference import InferenceNetwork, add_network_flags
from flowdiff.samplers import parse_grid, with_args
from flowdiff.speed import choose, device_kind
from flowdiff.utils import UsageError, atomic_path

MANIFEST = "manifest.json"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="flowdiff reflow",
        description="Integrate a teacher from noise and write the couplings (x_0, x_1, labels) "
        "for rectified-flow training (no --config needed); resumable.",
        exit_on_error=False,
    )
    add = parser.add_argument
    add("--ckpt", type=str, required=True, help="The teacher: a checkpoint of flowdiff fit.")
    add("--num-pairs", type=PositiveInt, required=True, help="Number of couplings to write.")
    add("--out", type=str, required=True, help="Output .pt file (its chunks go to OUT.parts/).")
    add(
        "--sampler",
        type=str | None,
        default=None,
        help="Sampler of the teacher's ODE (default: the teacher's own; rk4, heun, dopri5, ...).",
    )
    add("--steps", type=PositiveInt | None, default=None, help="Steps (fixed-grid samplers).")
    add("--grid", type=str | None, default=None, help="Time grid: uniform, edm, shift:S, power:P.")
    add("--atol", type=PositiveFloat | None, default=None, help="dopri5: absolute tolerance.")
    add("--rtol", type=PositiveFloat | None, default=None, help="dopri5: relative tolerance.")
    add(
        "--guidance",
        type=NonNegativeFloat | None,
        default=None,
        help="CFG scale of a conditional teacher (default 1: its conditional field).",
    )
    add("--seed", type=int, default=0, help="Seed of the noise (chunk c: seed * 1000003 + c).")
    add(
        "--batch-size",
        type=PositiveInt | None,
        default=None,
        help="Pairs a chunk (default: the data's: 1000 points, 128 images).",
    )
    add(
        "--overwrite",
        type=bool,
        default=False,
        help="Replace an existing OUT and OUT.parts/ (finished chunks too): draw everything anew.",
    )
    add("--accelerator", type=str, default="auto", help="auto (a CUDA GPU if any), cpu, cuda, gpu.")
    add_network_flags(add)
    add("--devices", type=int | str, default=1, help="Ranks on this node (launched by Fabric).")
    add("--num-nodes", type=PositiveInt, default=1, help="Nodes (torchrun or SLURM launch them).")
    return parser  # fmt: skip


def check_deterministic(model, sampler) -> None:
    """Refuse a sampler whose ``x_1`` is not a function of ``x_0`` (it draws fresh noise): its
    pairs would be a nearly independent coupling, not the teacher's ODE's."""
    if not sampler.deterministic:
        suggestion = "meanflow" if model.interval else "heun --steps 50"
        raise UsageError(
            f"reflow needs the coupling of the teacher's ODE, and {sampler!r} draws fresh noise "
            f"(x_1 is not a function of x_0): pass a deterministic sampler, e.g. --sampler "
            f"{suggestion} (euler, midpoint, rk4, dopri5 are deterministic too)"
        )


def label_frequencies(model, data: dict) -> list[float] | None:
    """``p(y = k)``, k < num_classes, that a conditional teacher's labels are drawn from: the
    class frequencies its checkpoint recorded of the data (``data``); None for a teacher without
    labels. A checkpoint that records none (an older flowdiff's) gets uniform ones, said once."""
    if not model.conditional:
        return None
    k = model.net.num_classes
    recorded = data.get("class_frequencies")
    if recorded is None:
        print("flowdiff: the teacher's checkpoint records no class frequencies (an older "
              "flowdiff's); its labels are drawn uniformly", file=sys.stderr)  # fmt: skip
        return [1.0 / k] * k
    if len(recorded) != k:
        raise UsageError(
            f"the teacher's checkpoint records {len(recorded)} class frequencies for a network "
            f"of {k} classes"
        )
    return [float(p) for p in recorded]


def chunk_labels(n: int, frequencies: list[float] | None, generator) -> torch.Tensor | None:
    """``n`` labels drawn i.i.d. from ``frequencies`` (None: a teacher without labels)."""
    if frequencies is None:
        return None
    p = torch.tensor(frequencies, dtype=torch.float64)
    return torch.multinomial(p, n, replacement=True, generator=generator)


def draw_chunk(model, sampler, c: int, lo: int, hi: int, seed: int, guidance, frequencies) -> dict:
    """Pairs ``lo..hi-1`` (chunk ``c``): ``x_0`` from the chunk's seed, then the labels drawn
    from ``frequencies`` with the same generator, and ``x_1`` the teacher's sample from them."""
    generator = chunk_generator(seed, c)
    x_0 = model.noise(hi - lo, generator)
    y = chunk_labels(hi - lo, frequencies, generator)
    y_dev = y.to(model.device) if y is not None else None
    # The generator goes on to the sampler (an SDE's noise), as in FlowModule.sample without x_0.
    result = model.sample(hi - lo, sampler, y_dev, guidance, generator, x_0=x_0)
    return {"x_0": x_0.float().cpu(), "x_1": result.x.float().cpu(), "y": y, "nfe": result.nfe}


def check_parts(parts: Path, settings: dict) -> None:
    """``parts`` is absent, or holds chunks of a run with these ``settings`` (to resume);
    anything else there is a UsageError (``--overwrite true`` removes it first)."""
    if not parts.exists():
        return
    try:
        recorded = json.loads((parts / MANIFEST).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == settings:
        return
    if recorded is None:
        raise UsageError(f"{str(parts)!r} is not a resumable reflow output (no manifest)")
    keys = sorted(k for k in settings | recorded if settings.get(k) != recorded.get(k))
    raise UsageError(
        f"{str(parts)!r} holds an unfinished reflow of other settings ({', '.join(keys)} differ); "
        "rerun with those, pass --overwrite true, or choose another --out"
    )


def make_parts(parts: Path, settings: dict) -> None:
    """``parts`` with the manifest of ``settings``, made at once (a folder renamed into place):
    every rank (each runs this before the ranks connect) finds it whole, or makes it."""
    check_parts(parts, settings)
    if parts.exists():
        return
    try:
        parts.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{parts.name}.", dir=parts.parent))
        (tmp / MANIFEST).write_text(json.dumps(settings, indent=2) + "\n")
    except OSError as err:
        raise UsageError(f"cannot write to {str(parts.parent)!r}: {err.strerror}") from err
    try:
        tmp.rename(parts)
    except OSError:  # another rank made it first
        shutil.rmtree(tmp, ignore_errors=True)
        check_parts(parts, settings)


def reflow_main(argv: list[str]) -> Path | None:
    cfg = build_parser().parse_args(argv)
    cfg.num_pairs = int(cfg.num_pairs)  # plain numbers: they go into a weights_only file
    out = Path(cfg.out)
    if out.suffix != ".pt":
        raise UsageError(f"--out {cfg.out!r}: expected a .pt file")
    if out.exists() and not cfg.overwrite:
        raise UsageError(f"{cfg.out} exists; pass --overwrite true or choose another --out")
    grid = parse_grid(cfg.grid) if cfg.grid is not None else None
    atol, rtol = (None if v is None else float(v) for v in (cfg.atol, cfg.rtol))
    from flowdiff.checkpoint import load_run

    ckpt = Path(cfg.ckpt)
    run = load_run(ckpt)
    model = run.model
    if model.reads_text:  # its couplings would have to store captions, which reflow data cannot
        raise UsageError(
            f"{str(ckpt)!r} is a text model: flowdiff reflow takes unconditional or "
            "class-conditional teachers"
        )
    sampler = with_args(
        model.sampler, cfg.sampler, steps=cfg.steps, grid=grid, atol=atol, rtol=rtol
    )
    check_samplers(model, [sampler])
    check_deterministic(model, sampler)
    frequencies = label_frequencies(model, run.checkpoint.get("data") or {})
    guidance = None if cfg.guidance is None else float(cfg.guidance)
    check_guidance(model, [guidance] if guidance is not None else None)
    if model.conditional and guidance is None:
        guidance = 1.0
    batch_size = int(cfg.batch_size) if cfg.batch_size is not None else None
    if batch_size is None:
        batch_size = run.datamodule.evaluator().chunk_size if run.datamodule is not None else 1000
    stat = ckpt.stat()
    speed = choose(cfg.precision, cfg.compile, device_kind(cfg.accelerator))
    settings = {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "sampler": repr(sampler),
        "guidance": guidance,
        "seed": int(cfg.seed),
        "num_pairs": cfg.num_pairs,
        "batch_size": int(batch_size),
        "class_frequencies": frequencies,
        "precision": speed.precision,  # the pairs differ with it: chunks of one precision only
    }
    parts = out.with_name(out.name + ".parts")
    if not cfg.overwrite:
        make_parts(parts, settings)

    fabric = make_fabric(cfg.accelerator, cfg.devices, cfg.num_nodes)
    fabric.launch()
    rank0 = fabric.global_rank == 0
    if cfg.overwrite:
        # Once, by rank 0, with the ranks connected: a rank that removed the parts before the
        # launch could remove those another rank had just made.
        if rank0:
            if parts.is_dir():
                shutil.rmtree(parts)
            elif parts.exists():
                parts.unlink()
            make_parts(parts, settings)
        fabric.barrier()
    model.to(fabric.device)
    model.inference = InferenceNetwork(model.net, speed.precision, speed.compile)
    chunks = math.ceil(cfg.num_pairs / batch_size)
    mine = range(fabric.global_rank, chunks, fabric.world_size)
    todo = [c for c in mine if not (parts / f"chunk-{c:06d}.pt").exists()]
    if rank0:
        print(speed.line(), flush=True)
        done = sum((parts / f"chunk-{c:06d}.pt").exists() for c in range(chunks))
        kept = f"; {done} finished chunks kept" if done else ""
        print(f"flowdiff: reflow {cfg.num_pairs} pairs in {chunks} chunks with {sampler!r}"
              f"{kept}", file=sys.stderr, flush=True)  # fmt: skip
    from tqdm import tqdm

    start = time.perf_counter()
    quiet = not rank0 or not sys.stderr.isatty()
    for c in tqdm(todo, desc="reflow", unit="chunk", disable=quiet):
        lo, hi = c * batch_size, min(cfg.num_pairs, (c + 1) * batch_size)
        chunk = draw_chunk(model, sampler, c, lo, hi, cfg.seed, guidance, frequencies)
        with atomic_path(parts / f"chunk-{c:06d}.pt") as tmp:
            torch.save(chunk, tmp)
    fabric.barrier()
    if not rank0:
        return None
    loaded = [torch.load(parts / f"chunk-{c:06d}.pt", weights_only=True) for c in range(chunks)]
    payload = {
        "x": torch.cat([p["x_1"] for p in loaded]),
        "x_0": torch.cat([p["x_0"] for p in loaded]),
        "teacher": {
            **settings,
            "nfe": max(p["nfe"] for p in loaded),
            "compile": speed.compile,
            "data": run.checkpoint["data"],
        },
    }
    if model.conditional:
        payload["y"] = torch.cat([p["y"] for p in loaded])
        names = run.checkpoint["data"].get("class_names")
        if names:
            payload["class_names"] = list(names)
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    shutil.rmtree(parts)
    seconds = time.perf_counter() - start
    print(f"flowdiff: wrote {cfg.num_pairs} pairs to {out} ({len(todo)} chunks drawn in "
          f"{seconds:.1f} s, NFE {payload['teacher']['nfe']})")  # fmt: skip
    return out
