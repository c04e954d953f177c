"""Shapes: the three ways text enters the DiT (pooled adaLN, cross-attention, joint attention)
after the same CPU time.

Each mode trains configs/shapes_text.yaml as shipped but for ``text_mode`` in its own `flowdiff
fit` process with one intra-op thread until the process has used ``--cpu-seconds`` of CPU time
(bench/_timer.py CPUBudget; the three run side by side), then each checkpoint is scored by
`flowdiff evaluate` with the same protocol (prompts: held-out captions, half of them of held-out
combinations; FD, R-precision, per-attribute accuracy) over ``--guidance``. Prints one markdown
table. Run by hand (the default is about 1.5 hours of wall time on 2 free CPU cores):

    python bench/text_modes.py [--cpu-seconds 1800] [--num-samples 500] [--guidance 1,2,3,4]
        [--steps 20] [--out runs/text-modes] [--evaluate-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("pooled", "cross", "joint")
KEYS = ("fd", "r_precision", "seen_all", "held_out_all")


def fit(mode: str, args, env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flowdiff.cli", "fit", "--config", "shapes_text.yaml",
         "--model.net.init_args.text_mode", mode,
         "--trainer.default_root_dir", str(args.out / mode), "--trainer.logger", "false",
         "--trainer.max_steps", "1000000", "--trainer.callbacks+=_timer.CPUBudget",
         "--trainer.callbacks.init_args.seconds", str(args.cpu_seconds)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(args.out / f"{mode}.log", "w"),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds", type=float, default=1800)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--guidance", default="1,2,3,4")
    parser.add_argument("--steps", default="20", help="Euler steps of the evaluation's sampler")
    parser.add_argument("--out", type=Path, default=Path("runs/text-modes"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--evaluate-only", action="store_true", help="score the runs in --out")
    args = parser.parse_args()
    modes = args.modes.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": path}  # fmt: skip
    fits = {} if args.evaluate_only else {mode: fit(mode, args, env) for mode in modes}
    for mode, process in fits.items():
        if process.wait():
            sys.exit(f"flowdiff fit of {mode} failed (see {args.out / f'{mode}.log'})")
    import torch

    print(
        f"| text mode | parameters | steps in {args.cpu_seconds:.0f} CPU-s | best w | FD | "
        "R-precision | all right (seen) | all right (held-out) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        ckpt = args.out / mode / "checkpoints" / "last.ckpt"
        out = args.out / mode / "eval"
        subprocess.run(
            [sys.executable, "-m", "flowdiff.cli", "evaluate", "--ckpt", str(ckpt),
             "--guidance", args.guidance, "--steps", args.steps,
             "--num-samples", str(args.num_samples), "--nll", "false", "--wandb", "false",
             "--out", str(out), "--overwrite", "true"],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        report = json.loads((out / "metrics.json").read_text())
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        params = sum(v.numel() for k, v in saved["state_dict"].items()
                     if k.startswith(("net.", "text_encoder.")))  # fmt: skip
        # The best scale: most samples with every attribute right, then the lowest FD.
        best = max(report["rows"], key=lambda r: (
            r["metrics"]["seen_all"] + r["metrics"]["held_out_all"], -r["metrics"]["fd"]
        ))  # fmt: skip
        m = best["metrics"]
        print(f"| {mode} | {params / 1e6:.2f} M | {saved['global_step']} | {best['guidance']:g} | "
              f"{m['fd']:.2f} | {m['r_precision']:.3f} | {m['seen_all']:.3f} | "
              f"{m['held_out_all']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
