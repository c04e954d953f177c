"""Sample quality of the shipped toy config: exact W2 against the sampling floor.

For each dataset, trains `flowdiff fit --config toy.yaml` as shipped (only the dataset changed),
draws 5,000 samples with 100 Euler steps from `last.ckpt` (EMA weights), and computes the exact
W2 (POT) to 5,000 fresh data points; the floor is the W2 between two independent 5,000-point data
sets. Both are averaged over 5 seeds (one seed's ratio swings by +-30% on 8 gaussians: the 8 modes'
sample counts fluctuate). The usual recipe (MLP 3x256, Adam 1e-3, batch 256, 5,000 steps, constant
rate, no EMA) is trained and scored the same way, side by side. Run by hand (about 3 minutes a
dataset on 2 CPU cores):

    python bench/toy_quality.py [--datasets moons 8gaussians checkerboard] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N = 5000
SEEDS = range(5)
USUAL_RECIPE = [
    "--trainer.max_steps",
    "5000",
    "--model.lr_schedule",
    "constant",
    "--ema.decay",
    "0.0",
]  # decay 0: the "average" is the current weights


def evaluate(ckpt: Path) -> dict:
    from flowdiff.checkpoint import load_run
    from flowdiff.metrics import wasserstein2
    from flowdiff.samplers import EulerSampler

    run = load_run(ckpt)
    w2s, floors = [], []
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        samples = run.model.sample(N, EulerSampler(100), generator=generator).x
        data, _ = run.datamodule.reference(N, seed=10_000 + seed)
        other, _ = run.datamodule.reference(N, seed=20_000 + seed)
        w2s.append(wasserstein2(samples, data))
        floors.append(wasserstein2(other, data))
    w2, floor = sum(w2s) / len(w2s), sum(floors) / len(floors)
    return {
        "w2": w2,
        "floor": floor,
        "ratio": w2 / floor,
        "ratio_per_seed": [a / b for a, b in zip(w2s, floors, strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="toy.yaml")
    parser.add_argument("--datasets", nargs="+", default=["moons", "8gaussians", "checkerboard"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            for recipe, extra in (("flowdiff", []), ("usual recipe", USUAL_RECIPE)):
                root = Path(tmp) / f"{name}-{len(extra)}"
                start = time.perf_counter()
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "flowdiff.cli",
                        "fit",
                        "--config",
                        args.config,
                        "--data.init_args.dataset",
                        name,
                        "--trainer.default_root_dir",
                        str(root),
                        "--trainer.logger",
                        "false",
                        *extra,
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                seconds = time.perf_counter() - start
                r = {**evaluate(root / "checkpoints" / "last.ckpt"), "fit_seconds": seconds}
                results[f"{name}/{recipe}"] = r
                print(
                    f"{name:13} {recipe:13} W2 {r['w2']:.4f}  floor {r['floor']:.4f}  "
                    f"ratio {r['ratio']:.2f}  (per seed {min(r['ratio_per_seed']):.2f}-"
                    f"{max(r['ratio_per_seed']):.2f}; fit {seconds:.0f} s)",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
