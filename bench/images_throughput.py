"""Image folders against the MNIST datamodule: training images/s of `flowdiff fit` on MNIST written
out as a folder of PNGs (ImageFolderDataModule, images.yaml) against MNIST's own datamodule
(mnist.yaml), with the same U-Net, batch and optimizer. Run by hand (a few minutes on 2 cores):

    python bench/images_throughput.py [--steps 40] [--repeats 3] [--png-dir data/mnist_png]

Needs MNIST in ./data (`make data`). The 60k training images are written once as
``<png-dir>/<digit>/<index>.png`` (the test helper of the issue; kept for later runs), decoded once
into the image cache (timed: the first run's cost), then both runs alternate in fresh processes,
``--repeats`` times each; the figure is the ratio of the medians, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _timer import timed_fit

WARMUP = 5
BATCH = 250


def write_png_folder(out: Path) -> int:
    """MNIST's 60k training images as PNGs in one folder per digit (once); the count."""
    from PIL import Image

    from flowdiff.data.mnist_files import find_or_prepare_mnist, load_split

    images, labels = load_split(find_or_prepare_mnist("data", False), train=True)
    done = out / ".complete"
    if done.is_file():
        return len(labels)
    for k in range(10):
        (out / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist(), strict=True)):
        Image.fromarray(image).save(out / str(label) / f"{i:05d}.png")
    done.write_text("")
    return len(labels)


def folder_args(png_dir: Path, cache: Path) -> list[str]:
    return [
        "--config", "images.yaml", "--data.init_args.root", str(png_dir),
        "--data.init_args.image_size", "28", "--data.init_args.channels", "1",
        "--data.init_args.batch_size", str(BATCH), "--data.init_args.cache_dir", str(cache),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png-dir", default="data/mnist_png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    png_dir = Path(args.png_dir)
    start = time.perf_counter()
    count = write_png_folder(png_dir)
    print(f"{count} PNGs in {png_dir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        from flowdiff.data.images import ImageFolderDataModule

        start = time.perf_counter()
        ImageFolderDataModule(str(png_dir), 28, 1, cache_dir=str(cache)).setup()
        decode_seconds = time.perf_counter() - start
        common = ["--trainer.max_steps", str(args.steps), "--trainer.logger", "false",
                  "--trainer.val_check_interval", "100000"]  # fmt: skip
        configs = {"mnist": ["--config", "mnist.yaml"], "folder": folder_args(png_dir, cache)}
        runs = {name: [] for name in configs}
        for r in range(args.repeats):
            for name, extra in configs.items():
                root = ["--trainer.default_root_dir", str(work / f"{name}-{r}")]
                timing = timed_fit([*extra, *common, *root], work, WARMUP)
                rate = timing["steps"] * BATCH / timing["seconds"]
                runs[name].append(rate)
                print(f"{name} run {r + 1}: {rate:.0f} images/s", file=sys.stderr)
    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    result = {
        "cpu": _cpu(),
        "pngs": count,
        "decode_seconds (first run only)": round(decode_seconds, 1),
        "images_per_s": {k: round(v, 1) for k, v in medians.items()},
        "runs": runs,
        "ratio folder / mnist": round(medians["folder"] / medians["mnist"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
