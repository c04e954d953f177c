"""MNIST: the DiT of mnist_dit.yaml against the U-Net of mnist.yaml after the same CPU time.

Each config trains as shipped in its own `flowdiff fit` process with one intra-op thread
(OMP_NUM_THREADS=1, as the evaluations) until the process has used ``--cpu-seconds`` of CPU time
(bench/_timer.py CPUBudget; the two run side by side), then both checkpoints are scored by
`flowdiff evaluate` with the same protocol: FD and KID on the MNIST classifier's features,
precision, recall and class accuracy at 10, 20 and 50 Euler steps and guidance 3. Needs
MNIST in ./data (`make data`).
Run by hand (about an hour on 2 CPU cores):

    python bench/mnist_dit_quality.py [--cpu-seconds 1200] [--num-samples 500]
        [--out runs/dit-vs-unet] [--only dit]

``--only`` trains and scores one of the two (the budget is CPU time per process, so a config
run alone gets the figures it would side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {"unet": "mnist.yaml", "dit": "mnist_dit.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds", type=float, default=1200)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/dit-vs-unet"))
    parser.add_argument("--evaluate-only", action="store_true", help="score the runs in --out")
    parser.add_argument("--only", choices=sorted(CONFIGS), help="train and score this net alone")
    args = parser.parse_args()
    configs = {args.only: CONFIGS[args.only]} if args.only else CONFIGS
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": path}  # fmt: skip
    fits = (
        {}
        if args.evaluate_only
        else {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flowdiff.cli",
                    "fit",
                    "--config",
                    config,
                    "--trainer.default_root_dir",
                    str(args.out / name),
                    "--trainer.logger",
                    "false",
                    "--trainer.val_check_interval",
                    "100000",
                    "--trainer.max_steps",
                    "100000",
                    "--trainer.callbacks+=_timer.CPUBudget",
                    "--trainer.callbacks.init_args.seconds",
                    str(args.cpu_seconds),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for name, config in configs.items()
        }
    )
    for name, process in fits.items():
        if process.wait():
            sys.exit(f"flowdiff fit of {name} failed")
    tables = {}
    for name in configs:
        ckpt = args.out / name / "checkpoints" / "last.ckpt"
        out = args.out / name / "eval"
        subprocess.run(
            [sys.executable, "-m", "flowdiff.cli", "evaluate", "--ckpt", str(ckpt),
             "--steps", "10,20,50", "--guidance", "3", "--num-samples", str(args.num_samples),
             "--nll", "false", "--wandb", "false", "--out", str(out), "--overwrite", "true"],
            env=env, check=True,
        )  # fmt: skip
        tables[name] = json.loads((out / "metrics.json").read_text())
    import torch

    for name in configs:
        step = torch.load(args.out / name / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)["global_step"]  # fmt: skip
        print(f"{name}: {step} steps in {args.cpu_seconds:.0f} s of CPU time")
    print("| net | steps | w | FD | KID | precision | recall | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for name, report in tables.items():
        for r in report["rows"]:
            m = r["metrics"]
            print(f"| {name} | {r['steps']} | {r['guidance']:g} | {m['fid']:.2f} | "
                  f"{m['kid_mean']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                  f"{m['class_accuracy']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
