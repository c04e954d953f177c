"""Sample quality of the shipped toy config: exact W2 against the sampling floor.

For each dataset, trains `flowdiff fit --config toy.yaml` as shipped (only the dataset changed),
draws 5,000 samples with 100 Euler steps from `last.ckpt` (EMA weights), and computes the exact
W2 (POT) to 5,000 fresh data points; the floor is the W2 between two independent 5,000-point data
sets. Run by hand (about 2 minutes a dataset on 2 CPU cores):

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


def evaluate(ckpt: Path, seed: int = 0) -> dict:
    from flowdiff.checkpoint import load_run
    from flowdiff.metrics import wasserstein2
    from flowdiff.samplers import EulerSampler

    run = load_run(ckpt)
    result = run.model.sample(N, EulerSampler(100), generator=torch.Generator().manual_seed(seed))
    data, _ = run.datamodule.reference(N, seed=10_000 + seed)
    other, _ = run.datamodule.reference(N, seed=20_000 + seed)
    w2, floor = wasserstein2(result.x, data), wasserstein2(other, data)
    return {"w2": w2, "floor": floor, "ratio": w2 / floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="toy.yaml")
    parser.add_argument("--datasets", nargs="+", default=["moons", "8gaussians", "checkerboard"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            root = Path(tmp) / name
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
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            seconds = time.perf_counter() - start
            results[name] = {**evaluate(root / "checkpoints" / "last.ckpt"), "fit_seconds": seconds}
            r = results[name]
            print(
                f"{name:13} W2 {r['w2']:.4f}  floor {r['floor']:.4f}  ratio {r['ratio']:.2f}  "
                f"(fit {seconds:.0f} s)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
