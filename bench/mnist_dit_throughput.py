"""Training images/s of the U-Net (mnist.yaml) against DiTs (mnist_dit.yaml as shipped, and
other sizes), with each network's FLOP per image and parameters. Run by hand:

    python bench/mnist_dit_throughput.py [--steps 30] [--repeats 2] [--dit 4,192,6,4 ...]
    python bench/mnist_dit_throughput.py --fit [--steps 30] [--repeats 2]

By default, one process times training steps (FlowModule.loss, backward, fused Adam; batch 250
of random images) of every network in turns, ``--steps`` steps each a round: a change in the
machine's load falls on all of them alike. ``--threads 1`` keeps a shared machine's other work
from stalling the intra-op threads. With ``--fit``, each run is a fresh `flowdiff fit` process
(its own threads) timed from step 5 to the last (needs MNIST in ./data, `make data`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _timer import timed_fit

WARMUP = 5
BATCH = 250  # batch_size of both configs


def gflop(net: torch.nn.Module) -> float:
    """Forward FLOP of one 28x28 image, from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = torch.randn(8, 1, 28, 28), torch.rand(8), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as counter:
        net(x, t, y)
    return counter.get_total_flops() / 8e9


def variants(dits: list[str]) -> dict[str, tuple[list[str], torch.nn.Module]]:
    """name -> (fit arguments, the network they build)."""
    from flowdiff.cli import resolve_config
    from flowdiff.nets.dit import DiT
    from flowdiff.nets.unet import UNet

    def net_args(config: str) -> dict:
        return yaml.safe_load(Path(resolve_config(config)).read_text())["model"]["net"]["init_args"]

    shipped = net_args("mnist_dit.yaml")
    out = {
        "unet (mnist.yaml)": (["--config", "mnist.yaml"], UNet(**net_args("mnist.yaml"))),
        "dit (mnist_dit.yaml)": (["--config", "mnist_dit.yaml"], DiT(**shipped)),
    }
    for spec in dits:
        patch, hidden, depth, heads = (int(v) for v in spec.split(","))
        sizes = {"patch_size": patch, "hidden": hidden, "depth": depth, "num_heads": heads}
        args = ["--config", "mnist_dit.yaml"]
        for key, value in sizes.items():
            args += [f"--model.net.init_args.{key}", str(value)]
        name = f"dit p{patch} hidden {hidden} depth {depth} heads {heads}"
        out[name] = (args, DiT(**{**shipped, **sizes}))
    return out


def step_rate(net: torch.nn.Module, steps: int) -> float:
    """Training images/s of ``steps`` steps of CFM on random 28x28 images (after one untimed)."""
    from flowdiff.module import FlowModule
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath

    model = FlowModule(net, GaussianConditionalPath("linear"), ConditionalFlowMatching(),
                       data_shape=[1, 28, 28], num_classes=10)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    z, y = torch.rand(BATCH, 1, 28, 28) * 2 - 1, torch.randint(0, 11, (BATCH,))
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        optimizer.zero_grad()
        model.loss(z, y).backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - start)


def fit_rate(fit_args: list[str], steps: int, tmp: str) -> float:
    """Training images/s of a fresh `flowdiff fit` process, from step WARMUP to the last."""
    root = Path(tmp) / f"run-{time.time_ns()}"
    args = [*fit_args, "--trainer.max_steps", str(steps), "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    timing = timed_fit(args, tmp, WARMUP)
    return timing["steps"] * BATCH / timing["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dit", nargs="*", default=[], help="patch,hidden,depth,heads")
    parser.add_argument("--fit", action="store_true", help="time `flowdiff fit` processes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flowdiff.utils import keep_freed_memory

    keep_freed_memory()  # as `flowdiff` does
    runs = variants(args.dit)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, (fit_args, net) in runs.items():
                rates[name].append(fit_rate(fit_args, args.steps, tmp) if args.fit
                                   else step_rate(net, args.steps))  # fmt: skip
                print(f"{name}: {rates[name][-1]:.1f} images/s", flush=True)
    how = f"`flowdiff fit`, steps {WARMUP}..{args.steps}" if args.fit else f"{args.steps} steps"
    threads = torch.get_num_threads()
    print(f"\ntraining images/s ({how}), median of {args.repeats}, {threads} threads:")
    for name, (_, net) in runs.items():
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(
            f"  {name:36}{statistics.median(rates[name]):7.1f}   {gflop(net):.3f} GFLOP/image   "
            f"{params:.2f} M parameters"
        )


if __name__ == "__main__":
    main()
