"""MNIST throughput: training images/s of `flowdiff fit` against a bare loop, the U-Net's FLOPs and
the share of the CPU's fp32 matmul peak that training reaches, and guided sampling with one
batched forward against two separate forwards. Run by hand (about 5 minutes on 2 CPU cores):

    python bench/mnist_throughput.py [--steps 40] [--repeats 3] [--compiled] [--json results.json]

Needs MNIST in ./data (`make data`). All figures come from this one run:

- peak: the faster of two fp32 GEMMs, best of 10: torch.mm 2048x2048 (MKL; on AMD CPUs it takes
  slower code paths) and a 1x1 convolution with 1024 channels (oneDNN, which runs the U-Net);
- U-Net FLOP per image, forward and forward + backward, from torch's FLOP counter;
- flowdiff: `flowdiff fit --config mnist.yaml` in a fresh process, images/s timed from step 5 to
  the last step (no validation falls in that window; its cost at the shipped interval is
  reported separately); with ``--compiled``, also `flowdiff fit --model.compile true` (compiled
  at the first batch, before the timed steps; the compilation time is reported);
- bare loop: the same U-Net (channels_last), batch, fused Adam and CFM loss with label dropout,
  batches drawn from the same in-memory images, in a fresh process; plain, and with flowdiff's
  malloc setting (`flowdiff.utils.keep_freed_memory`), to separate the two;
- sampling: 50 guided Euler steps for 128 images, the null and conditional branches in one
  forward of 2B against two forwards of B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _timer import timed_fit

HERE = Path(__file__).resolve().parent
WARMUP = 5


def _best_rate(fn, flop: float, repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def matmul_peak() -> dict:
    """fp32 GEMM GFLOP/s two ways: torch.mm (MKL, which takes slow paths on AMD CPUs) and a 1x1
    convolution (oneDNN, the library the U-Net's convolutions run on). The peak is the larger."""
    import torch.nn.functional as F

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mkl = _best_rate(lambda: a @ b, 2 * n**3)
    x = torch.randn(64, 1024, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1)
    onednn = _best_rate(lambda: F.conv2d(x, w), 2 * 64 * 256 * 1024 * 1024)
    return {"mkl_matmul": mkl, "onednn_1x1_conv": onednn, "peak": max(mkl, onednn)}


def build_net(config: dict):
    from flowdiff.nets.unet import UNet

    return UNet(**config["model"]["net"]["init_args"]).to(memory_format=torch.channels_last)


def unet_gflop(config: dict) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    net = build_net(config)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    t, y = torch.rand(8), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as forward:
        net(x, t, y)
    with FlopCounterMode(display=False) as train:
        net(x, t, y).square().mean().backward()
    return forward.get_total_flops() / 8e9, train.get_total_flops() / 8e9


def bare_loop(config: dict, steps: int, allocator: bool) -> dict:
    """A hand-written training loop: same U-Net, batch, optimizer, loss and label dropout;
    with ``allocator``, also flowdiff's malloc setting (freed memory kept for reuse)."""
    if allocator:
        from flowdiff.utils import keep_freed_memory

        keep_freed_memory()
    from flowdiff.data.mnist import pixels_to_float
    from flowdiff.data.mnist_files import find_or_prepare_mnist, load_split

    data_cfg = config["data"]["init_args"]
    images, labels = load_split(find_or_prepare_mnist(data_cfg["data_dir"], False), train=True)
    net = build_net(config)
    opt_args = config["model"]["optimizer"]["init_args"]
    optimizer = torch.optim.Adam(net.parameters(), **opt_args)
    batch, p_uncond = data_cfg["batch_size"], data_cfg["p_uncond"]
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        z = pixels_to_float(images[idx].unsqueeze(1)).contiguous(memory_format=torch.channels_last)
        y = torch.where(torch.rand(batch) < p_uncond, 10, labels[idx])
        t = torch.rand(batch)
        eps = torch.randn_like(z)
        x_t = t[:, None, None, None] * z + (1 - t[:, None, None, None]) * eps
        loss = (net(x_t, t, y) - (z - eps)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"images": (steps - WARMUP) * batch, "seconds": seconds}


def run_flowdiff(steps: int, workdir: Path, extra=()) -> dict:
    args = [
        "--config",
        "mnist.yaml",
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(workdir / f"run-{time.time_ns()}"),
        *extra,
    ]
    timing = timed_fit(args, workdir, WARMUP)
    return {**timing, "images": timing["steps"] * 250}


def sampling(config: dict, n: int = 128, steps: int = 50) -> dict:
    """Images/s of guided Euler sampling: one forward of 2B against two forwards of B."""
    from flowdiff.fields import ModelField, guide
    from flowdiff.paths import GaussianConditionalPath
    from flowdiff.samplers import EulerSampler

    net = build_net(config).eval()
    path = GaussianConditionalPath()
    y = torch.arange(n) % 10

    class TwoForwards(ModelField):
        def output(self, x, t):
            t = t.expand(x.shape[0]) if t.ndim == 0 else t
            null = torch.full_like(self.y, self.null_label)
            return guide(self.net(x, t, null), self.net(x, t, self.y), self.guidance)

    out = {}
    for name, cls in (("batched", ModelField), ("two_forwards", TwoForwards)):
        field = cls(net, path, "velocity", y=y, guidance=3.0, null_label=10)
        x_0 = torch.randn(n, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        EulerSampler(2).sample(field, x_0)
        start = time.perf_counter()
        EulerSampler(steps).sample(field, x_0)
        out[name] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time `flowdiff fit --model.compile true` (compilation, at the first batch, "
        "falls before the timed steps)",
    )
    parser.add_argument("--bare", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from flowdiff.cli import resolve_config

    config = yaml.safe_load(Path(resolve_config("mnist.yaml")).read_text())
    if args.bare is not None:
        print(json.dumps(bare_loop(config, int(args.bare[0]), args.bare[1] == "allocator")))
        return
    from flowdiff.utils import keep_freed_memory

    keep_freed_memory()  # as `flowdiff` does, for the sampling figures below
    peaks = matmul_peak()
    peak = peaks["peak"]
    forward_gflop, train_gflop = unet_gflop(config)
    print(
        f"fp32 GEMM: {peaks['mkl_matmul']:.0f} GFLOP/s torch.mm (MKL), "
        f"{peaks['onednn_1x1_conv']:.0f} GFLOP/s 1x1 conv (oneDNN); peak {peak:.0f}. U-Net: "
        f"{forward_gflop:.3f} GFLOP/image forward, {train_gflop:.3f} forward + backward",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            fd = run_flowdiff(args.steps, Path(tmp))
            row = {"flowdiff": fd["images"] / fd["seconds"]}
            if args.compiled:
                fc = run_flowdiff(args.steps, Path(tmp), ["--model.compile", "true"])
                row["flowdiff_compiled"] = fc["images"] / fc["seconds"]
                row["compile_seconds"] = fc.get("compile_seconds", float("nan"))
                row["ratio_compiled"] = row["flowdiff_compiled"] / row["flowdiff"]
                print(
                    f"repeat {i}: flowdiff --model.compile true {row['flowdiff_compiled']:.1f} "
                    f"images/s ({row['ratio_compiled']:.3f}x eager), first batch "
                    f"{row['compile_seconds']:.1f} s",
                    flush=True,
                )
            for variant in ("plain", "allocator"):
                cmd = [sys.executable, __file__, "--bare", str(args.steps), variant]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                bare = json.loads(out)
                row[f"bare_{variant}"] = bare["images"] / bare["seconds"]
                row[f"ratio_{variant}"] = row["flowdiff"] / row[f"bare_{variant}"]
            rows.append(row)
            print(
                f"repeat {i}: flowdiff {row['flowdiff']:.1f} images/s; bare loop "
                f"{row['bare_plain']:.1f} (ratio {row['ratio_plain']:.3f}), with flowdiff's "
                f"allocator setting {row['bare_allocator']:.1f} "
                f"(ratio {row['ratio_allocator']:.3f})",
                flush=True,
            )
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    samp = sampling(config)
    summary = {
        "gemm_gflops": peaks,
        "unet_gflop_forward": forward_gflop,
        "unet_gflop_train": train_gflop,
        "median": median,
        "runs": rows,
        "peak_fraction": {
            k: median[k] * train_gflop / peak for k in median if k.startswith(("flowdiff", "bare"))
        },
        "sampling_images_per_s": samp,
        "sampling_1000_images_50_steps_s": 1000 / samp["batched"],
    }
    print(f"\ntraining images/s, median of {args.repeats}:")
    if args.compiled:
        print(
            f"  flowdiff_compiled{median['flowdiff_compiled']:7.1f}   "
            f"{100 * summary['peak_fraction']['flowdiff_compiled']:4.0f}% of peak  "
            f"compiled / eager {median['ratio_compiled']:.3f} (paired), first batch "
            f"{median['compile_seconds']:.1f} s"
        )
    for key in ("flowdiff", "bare_plain", "bare_allocator"):
        ratio = (
            ""
            if key == "flowdiff"
            else f"  flowdiff / this {median[key.replace('bare', 'ratio')]:.3f}"
        )
        print(
            f"  {key:16}{median[key]:8.1f}   {100 * summary['peak_fraction'][key]:4.0f}% of peak"
            f"{ratio}"
        )
    print(
        f"guided sampling, 50 Euler steps, 128 images: {samp['batched']:.1f} images/s with one "
        f"forward of 2B, {samp['two_forwards']:.1f} with two forwards of B; 1,000 images in "
        f"{summary['sampling_1000_images_50_steps_s']:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
