"""Guided MNIST sampling with and without torch.compile, at fp32 and bf16 (autocast): images/s
and compile time. Run by hand (about 5 minutes on 2 CPU cores):

    python bench/compile.py [--batch 250] [--steps 5] [--repeats 3] [--device auto] [--json F]

The network is `configs/mnist.yaml`'s U-Net (random weights: speed does not depend on them),
run as `flowdiff sample` runs it (:class:`flowdiff.inference.InferenceNetwork`), guided (the null
and conditional branches in one forward of 2 x batch), Euler steps. Each variant is compiled
once (the first call, timed: compilation and one forward); then the variants are timed in turn,
``repeats`` times, alternating, and the median is reported (a shared machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

VARIANTS = [("32-true", False), ("32-true", True), ("bf16-mixed", False), ("bf16-mixed", True)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from flowdiff.cli import resolve_config
    from flowdiff.fields import ModelField
    from flowdiff.inference import InferenceNetwork, resolve_device
    from flowdiff.nets.unet import UNet
    from flowdiff.paths import GaussianConditionalPath
    from flowdiff.samplers import EulerSampler
    from flowdiff.utils import keep_freed_memory

    keep_freed_memory()  # as `flowdiff` does
    device = resolve_device(args.device)
    config = yaml.safe_load(Path(resolve_config("mnist.yaml")).read_text())
    torch.manual_seed(0)
    net = UNet(**config["model"]["net"]["init_args"]).to(device, memory_format=torch.channels_last)
    net.eval()
    path, n = GaussianConditionalPath(), args.batch
    y = (torch.arange(n) % 10).to(device)
    x_0 = torch.randn(n, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)

    def run(network, steps: int) -> float:
        field = ModelField(network, path, "velocity", y=y, guidance=3.0, null_label=10)
        start = time.perf_counter()
        with torch.no_grad():
            EulerSampler(steps).sample(field, x_0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    networks, compile_s = {}, {}
    for precision, compiled in VARIANTS:
        name = f"{precision}{' compiled' if compiled else ''}"
        networks[name] = InferenceNetwork(net, precision, compiled)
        run(networks[name], 1)  # compiles (timed by InferenceNetwork) or warms up
        compile_s[name] = networks[name].compile_seconds
    rates = {name: [] for name in networks}
    for _ in range(args.repeats):
        for name, network in networks.items():
            rates[name].append(n / run(network, args.steps))
    torch._dynamo.reset()
    rows = {
        name: {"images_per_s": statistics.median(r), "runs": r, "compile_s": compile_s[name]}
        for name, r in rates.items()
    }
    summary = {
        "device": str(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": n,
        "euler_steps": args.steps,
        "rows": rows,
    }
    print(f"MNIST U-Net, guided Euler sampling, batch {n} ({2 * n} a forward), {args.steps} steps;"
          f" {summary['cpu']}, {summary['threads']} threads, {device}")  # fmt: skip
    print(f"{'variant':22}{'images/s':>10}{'vs eager':>10}{'compile s':>11}")
    for name, row in rows.items():
        eager = rows[name.replace(" compiled", "")]["images_per_s"]
        compiled = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else "-"
        ratio = row["images_per_s"] / eager
        print(f"{name:22}{row['images_per_s']:10.1f}{ratio:10.2f}{compiled:>11}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
