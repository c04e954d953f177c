"""Image folders against the MNIST datamodule in sample quality: `mnist.yaml` and `images.yaml` on
MNIST written out as PNGs (bench/images_throughput.py writes them), trained for the same number of
steps with the same U-Net, batch and optimizer, then both scored by one protocol: MNIST's own
evaluator (flowdiff's MNIST classifier features, the same 10,000 reference images, 1,000 guided
samples a row from the same noise). Run by hand (~2 x the training time, plus a few minutes):

    python bench/images_quality.py [--steps 600] [--png-dir data/mnist_png] [--out runs/bench-iq]

The folder run holds out 5,000 of the 60,000 images like mnist.yaml does (val_fraction 1/12).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def train(name: str, args: list[str], out: Path, steps: int) -> tuple[Path, float]:
    root = out / name
    cmd = [sys.executable, "-m", "flowdiff.cli", "fit", *args, "--trainer.max_steps", str(steps),
           "--trainer.default_root_dir", str(root), "--overwrite", "true",
           "--trainer.logger", "false", "--trainer.val_check_interval", str(steps)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root / "checkpoints" / "last.ckpt", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--png-dir", default="data/mnist_png")
    parser.add_argument("--out", default="runs/bench-images-quality")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=50, help="Euler steps of sampling")
    options = parser.parse_args()
    out = Path(options.out)
    folder = ["--config", "images.yaml", "--data.init_args.root", options.png_dir,
              "--data.init_args.image_size", "28", "--data.init_args.channels", "1",
              "--data.init_args.batch_size", "250",
              "--data.init_args.val_fraction", str(1 / 12)]  # fmt: skip
    runs = {"mnist.yaml (MNISTDataModule)": ["--config", "mnist.yaml"],
            "images.yaml (PNG folder)": folder}  # fmt: skip
    from flowdiff.checkpoint import load_run
    from flowdiff.data.mnist import MNISTDataModule
    from flowdiff.samplers import EulerSampler

    evaluator = MNISTDataModule("data", download=False).evaluator()
    evaluator.prepare(options.num_samples, lambda m: print(m, file=sys.stderr))
    labels = evaluator.labels(options.num_samples)
    table = {"floor": evaluator.floor}
    for i, (name, args) in enumerate(runs.items()):
        ckpt, seconds = train(f"run{i}", args, out, options.steps)
        model = load_run(ckpt).model
        sampler = EulerSampler(options.sample_steps)
        for w in (1.0, 3.0):
            x = model.sample(
                options.num_samples, sampler, y=labels, guidance=w,
                generator=torch.Generator().manual_seed(0), batch_size=128,
            ).x  # fmt: skip
            metrics = evaluator.score(x, labels)
            table[f"{name}, w = {w:g}"] = {"train_seconds": round(seconds), **metrics}
            print(
                f"{name} w={w:g}: {json.dumps(table[f'{name}, w = {w:g}'])[:300]}", file=sys.stderr
            )
    keys = ["fid", "kid_mean", "precision", "recall", "class_accuracy"]
    print(f"| run ({options.steps} steps) | train s | " + " | ".join(keys) + " |")
    for name, metrics in table.items():
        cells = [f"{metrics[k]:.3f}" if metrics.get(k) is not None else "-" for k in keys]
        print(f"| {name} | {metrics.get('train_seconds', '-')} | " + " | ".join(cells) + " |")
    (out / "quality.json").write_text(json.dumps(table, indent=2, default=str))


if __name__ == "__main__":
    main()
