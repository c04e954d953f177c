"""Training throughput of `flowdiff fit` on the toy config against a bare PyTorch loop.

All run in fresh processes, alternating, with the same network, batch size, optimizer (Adam and its
settings from the config) and data generator. flowdiff runs the shipped config as a user would (W&B
offline logging, EMA, the learning-rate schedule, validation with sampling, W2/MMD and a picture,
checkpoints) with one change: the CFM objective, the bare loop's loss (toy.yaml trains on the stable
target, whose reference-set average costs more a step). The bare loop draws a batch, computes the
CFM loss and steps the optimizer, nothing else, in two variants: with PyTorch's default Adam
implementation (what a hand-written loop gets: on a CPU, one small kernel launch per tensor) and
with the fused implementation that flowdiff's config selects. Steps/s are timed from step 100 to the
end of training. Run by hand:

    python bench/toy_throughput.py [--repeats 3] [--steps N] [--compiled] [--hidden H] [--json F]

``--hidden 8`` shrinks the MLP in both (flowdiff's run and the bare loop) until its arithmetic is
next to nothing: the difference of the two step times is then what flowdiff's loop, callbacks and
logging cost a step, the figure to compare with `bench/lightning_floor.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import yaml
from _timer import timed_fit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARMUP = 100
VARIANTS = ("default", "fused")


def load_config(name: str) -> dict:
    from flowdiff.cli import resolve_config

    return yaml.safe_load(Path(resolve_config(name)).read_text())


def with_hidden(config: dict, hidden: int | None) -> dict:
    if hidden is not None:
        config["model"]["net"].setdefault("init_args", {})["hidden"] = hidden
    return config


def bare_loop(config: dict, steps: int, fused: bool) -> dict:
    """The loop a user would write by hand: draw a batch, CFM loss, optimizer step."""
    import torch

    from flowdiff.data.toy import DATASETS
    from flowdiff.nets.mlp import MLP
    from flowdiff.utils import skip_nvml_probe_without_driver

    # flowdiff's imports bring Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 along; a loop written by
    # hand, without Lightning, would not pay for it at every optimizer step.
    skip_nvml_probe_without_driver()

    model_cfg, data_cfg = config["model"], config["data"]["init_args"]
    net = MLP(**model_cfg["net"].get("init_args", {}))
    opt_cfg = model_cfg["optimizer"]
    opt_cls = getattr(torch.optim, opt_cfg["class_path"].rsplit(".", 1)[-1])
    opt_args = {k: v for k, v in opt_cfg.get("init_args", {}).items() if k != "fused"}
    optimizer = opt_cls(net.parameters(), **opt_args, **({"fused": True} if fused else {}))
    sample = partial(DATASETS[data_cfg["dataset"]], data_cfg["batch_size"])
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        z, _ = sample(generator)
        t = torch.rand(z.shape[0])
        eps = torch.randn_like(z)
        x_t = t[:, None] * z + (1 - t[:, None]) * eps
        loss = (net(x_t, t) - (z - eps)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"steps": steps - WARMUP, "seconds": time.perf_counter() - start}


def run_flowdiff(config_name: str, steps: int | None, workdir: Path, extra=()) -> dict:
    args = [
        "--config",
        config_name,
        "--trainer.default_root_dir",
        str(workdir / f"run-{time.time_ns()}"),
        "--model.objective",  # the bare loop's loss (toy.yaml trains on the stable target)
        "flowdiff.objectives.ConditionalFlowMatching",
        *extra,
    ]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // 2)]
    return timed_fit(args, workdir, WARMUP)


def run_bare(config_name: str, steps: int, variant: str, hidden: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--config", config_name, "--bare", str(steps), variant]
    cmd += ["--hidden", str(hidden)] if hidden is not None else []
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="toy.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps a run (default: the config's max_steps)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time `flowdiff fit --model.compile true` (compilation, at the first batch, "
        "falls before the timed steps)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="the MLP's width in both (default: the config's); 8 leaves the overhead alone",
    )
    parser.add_argument("--bare", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = with_hidden(load_config(args.config), args.hidden)
    if args.bare is not None:
        steps, variant = int(args.bare[0]), args.bare[1]
        print(json.dumps(bare_loop(config, steps, fused=variant == "fused")))
        return
    steps = args.steps or config["trainer"]["max_steps"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            extra = (
                [] if args.hidden is None else ["--model.net.init_args.hidden", str(args.hidden)]
            )
            fd = run_flowdiff(args.config, args.steps, Path(tmp), extra)
            row = {"repeat": i, "flowdiff": fd["steps"] / fd["seconds"]}
            if args.compiled:
                compiled = [*extra, "--model.compile", "true"]
                fc = run_flowdiff(args.config, args.steps, Path(tmp), compiled)
                row["flowdiff_compiled"] = fc["steps"] / fc["seconds"]
            for variant in VARIANTS:
                bare = run_bare(args.config, steps, variant, args.hidden)
                row[f"bare_{variant}"] = bare["steps"] / bare["seconds"]
                row[f"ratio_{variant}"] = row["flowdiff"] / row[f"bare_{variant}"]
                if args.compiled:
                    row[f"ratio_compiled_{variant}"] = (
                        row["flowdiff_compiled"] / row[f"bare_{variant}"]
                    )
            rows.append(row)
            compiled = f"compiled {row['flowdiff_compiled']:6.1f}   " if args.compiled else ""
            print(
                f"repeat {i}: flowdiff {row['flowdiff']:6.1f} steps/s   {compiled}"
                + "   ".join(
                    f"bare ({v} Adam) {row[f'bare_{v}']:6.1f} steps/s, "
                    f"ratio {row[f'ratio_{v}']:.3f}"
                    for v in VARIANTS
                ),
                flush=True,
            )
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "repeat"}
    summary = {"config": args.config, "steps_per_run": steps, "median": median, "runs": rows}
    print(f"\n{'steps/s, median of ' + str(args.repeats):34}{'steps/s':>9}{'ratio':>8}")
    print(f"{'flowdiff fit (as shipped)':34}{median['flowdiff']:9.1f}")
    if args.compiled:
        print(f"{'flowdiff fit --model.compile true':34}{median['flowdiff_compiled']:9.1f}")
    for v in VARIANTS:
        print(
            f"{'bare loop, ' + v + ' Adam':34}{median[f'bare_{v}']:9.1f}{median[f'ratio_{v}']:8.3f}"
            + (f"  compiled: {median[f'ratio_compiled_{v}']:.3f}" if args.compiled else "")
        )
    ms = summary["ms_per_step"] = {
        key: 1e3 / median[key] for key in ("flowdiff", *(f"bare_{v}" for v in VARIANTS))
    }
    print(
        f"ms a step: flowdiff {ms['flowdiff']:.3f}, "
        + ", ".join(f"bare ({v} Adam) {ms[f'bare_{v}']:.3f}" for v in VARIANTS)
        + f"; flowdiff - bare (fused Adam) {ms['flowdiff'] - ms['bare_fused']:.3f}"
    )
    summary["hidden"] = args.hidden
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
