"""Training speed with text against labels at equal network size, on the Shapes data.

The same DiT (configs/shapes_text.yaml's: patch 4, hidden 128, depth 4) trains on the same
images, once conditioned on the combination as a class label (96 classes: a label embedding into
adaLN) and once on the captions (the trained text encoder, each ``text_mode``). Each run is a
`flowdiff fit` process with one intra-op thread; the CPU time (bench/_timer.py CPUStepTimer,
all threads of the process) of ``--steps`` training steps after a warm-up, validation off.
Prints one markdown table. Run by hand (a few minutes on 2 free CPU cores):

    python bench/text_speed.py [--steps 100] [--warmup 20] [--out runs/text-speed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def write_pairs(out: Path, n: int = 4096) -> tuple[Path, Path]:
    """The same n Shapes images twice: with their combinations as labels, and with captions."""
    from flowdiff.data.shapes import COMBINATIONS, SEEN, caption, draw_shapes

    g = torch.Generator().manual_seed(0)
    seen = torch.tensor([COMBINATIONS.index(c) for c in SEEN])
    combos = seen[torch.randint(len(seen), (n,), generator=g)]
    x = draw_shapes(combos, 24, g)
    labels, text = out / "labels.pt", out / "text.pt"
    torch.save({"x": x, "y": combos}, labels)
    torch.save({"x": x, "text": [caption(COMBINATIONS[c]) for c in combos.tolist()]}, text)
    return labels, text


def timed(name: str, data: Path, extra: list[str], args, env) -> dict:
    result = args.out / f"{name}.json"
    cmd = [sys.executable, "-m", "flowdiff.cli", "fit", "--config", "shapes_text.yaml",
           "--data", "flowdiff.data.pairs.TensorPairsDataModule", "--data.init_args.path",
           str(data), "--data.init_args.batch_size", "128", *extra,
           "--trainer.default_root_dir", str(args.out / name), "--trainer.logger", "false",
           "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
           "--trainer.callbacks+=_timer.CPUStepTimer",
           "--trainer.callbacks.init_args.warmup", str(args.warmup)]  # fmt: skip
    log = open(args.out / f"{name}.log", "w")
    env = {**env, "FLOWDIFF_BENCH_OUT": str(result)}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=log)
    timing = json.loads(result.read_text())
    saved = torch.load(args.out / name / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)  # fmt: skip
    net = sum(v.numel() for k, v in saved["state_dict"].items() if k.startswith("net."))
    text = sum(v.numel() for k, v in saved["state_dict"].items() if k.startswith("text_encoder."))
    return {**timing, "net": net, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps a run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=Path(f"runs/text-speed-{time.time_ns()}"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    labels, text = write_pairs(args.out)
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": path}
    runs = {
        "labels (96 classes)": timed("labels", labels, ["--model.text_encoder", "null"], args, env)
    }
    for mode in ("pooled", "cross", "joint"):
        extra = ["--model.net.init_args.text_mode", mode]
        runs[f"text, {mode}"] = timed(mode, text, extra, args, env)
    base = runs["labels (96 classes)"]
    per_step = base["cpu_seconds"] / base["steps"]
    print("| condition | DiT parameters | text encoder | CPU ms a step (batch 128) | vs labels |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        ms = 1000 * r["cpu_seconds"] / r["steps"]
        print(
            f"| {name} | {r['net'] / 1e6:.2f} M | {r['text'] / 1e3:.0f} k | {ms:.0f} | "
            f"{ms / 1000 / per_step:.2f}x |"
        )


if __name__ == "__main__":
    main()
