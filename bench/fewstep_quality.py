"""Few-step generation on 2D data (issue 13): W2 at 1, 2 and 4 NFE against the data floor.

For each dataset and seed, with the shipped configs and the commands a user types:

1. teacher: ``flowdiff fit --config toy.yaml`` (20,000 steps);
2. couplings: ``flowdiff reflow`` of the teacher (``--num-pairs``, RK4 with 25 steps);
3. 2-rectified flow: ``flowdiff fit --config toy_reflow.yaml --init_from TEACHER`` (10,000 steps);
4. MeanFlow from scratch: ``flowdiff fit --config toy_meanflow.yaml`` (20,000 steps);
5. ``flowdiff evaluate`` of each: the teacher with Euler at 1, 2, 4 and 100 steps, 2-RF with Euler
   at 1, 2, 4, MeanFlow with its sampler at 1, 2, 4 (evaluate's protocol: 5,000 samples against
   5,000 held-out points, exact W2; the floor is data against data; no likelihood).

Prints W2 / floor per model and NFE (the median over seeds) and each stage's wall time, and
checks the issue's target: one step <= 1.5x and two steps <= 1.2x the floor. Run by hand; on 2
busy CPU cores a dataset and seed takes about an hour (``--max-steps`` shortens every training
for a dry run):

    python bench/fewstep_quality.py [--datasets moons 8gaussians checkerboard] [--seeds 0 1 2]
        [--num-pairs 100000] [--workdir runs/fewstep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLOWDIFF = [sys.executable, "-m", "flowdiff.cli"]
TARGETS = {1: 1.5, 2: 1.2}


def run(args: list, log: Path) -> float:
    """``flowdiff ARGS`` in a fresh process, output to ``log``; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([*FLOWDIFF, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                       check=True)  # fmt: skip
    return time.perf_counter() - start


def ratios(metrics_json: Path) -> dict:
    """``{(sampler, steps): W2 / floor}`` of an evaluate output, and the floor."""
    report = json.loads(metrics_json.read_text())
    floor = report["floor"]["w2"]
    rows = {f"{r['name']}-{r['steps']}": r["metrics"]["w2"] / floor for r in report["rows"]}
    return {"floor": floor, "ratios": rows, "straightness": report["straightness"]["straightness"]}


def one(dataset: str, seed: int, work: Path, num_pairs: int, max_steps: int | None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    common = ["--seed_everything", seed, "--trainer.logger", "false"]
    common += ["--trainer.max_steps", max_steps] if max_steps else []
    ckpt = {name: work / name / "checkpoints" / "last.ckpt" for name in ("teacher", "rf2", "mf")}
    pairs = work / "pairs.pt"
    times = {}
    if not ckpt["teacher"].exists():
        times["teacher fit"] = run(["fit", "--config", "toy.yaml", "--data.init_args.dataset",
                                    dataset, "--trainer.default_root_dir", work / "teacher",
                                    *common], work / "teacher.log")  # fmt: skip
    if not pairs.exists():
        times["reflow"] = run(["reflow", "--ckpt", ckpt["teacher"], "--num-pairs", num_pairs,
                               "--sampler", "rk4", "--steps", 25, "--seed", seed,
                               "--out", pairs], work / "reflow.log")  # fmt: skip
    if not ckpt["rf2"].exists():
        times["2-RF fit"] = run(["fit", "--config", "toy_reflow.yaml", "--data.init_args.path",
                                 pairs, "--init_from", ckpt["teacher"],
                                 "--trainer.default_root_dir", work / "rf2", *common],
                                work / "rf2.log")  # fmt: skip
    if not ckpt["mf"].exists():
        times["MeanFlow fit"] = run(["fit", "--config", "toy_meanflow.yaml",
                                     "--data.init_args.dataset", dataset,
                                     "--trainer.default_root_dir", work / "mf", *common],
                                    work / "mf.log")  # fmt: skip
    sweeps = {
        "teacher": ["--steps", "1,2,4,100"],
        "rf2": ["--steps", "1,2,4"],
        "mf": ["--sampler", "meanflow", "--steps", "1,2,4"],
    }
    results = {}
    for name, sweep in sweeps.items():
        out = work / name / "eval"
        times[f"{name} evaluate"] = run(["evaluate", "--ckpt", ckpt[name], *sweep, "--nll",
                                         "false", "--wandb", "false", "--overwrite", "true",
                                         "--out", out], work / f"{name}-eval.log")  # fmt: skip
        results[name] = ratios(out / "metrics.json")
    return {"results": results, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["moons", "8gaussians", "checkerboard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-pairs", type=int, default=100_000)
    parser.add_argument("--max-steps", type=int, default=None, help="Shorter trainings (dry run).")
    parser.add_argument("--workdir", type=Path, default=Path("runs/fewstep"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    table = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            work = args.workdir / f"{dataset}-seed{seed}"
            table[f"{dataset}-seed{seed}"] = result = one(
                dataset, seed, work, args.num_pairs, args.max_steps
            )
            print(f"{dataset} seed {seed}: {json.dumps(result)}", flush=True)
    print("\nW2 / data floor, median over seeds (target: 1 NFE <= 1.5, 2 NFE <= 1.2)")
    rows = [("teacher", "euler"), ("rf2", "euler"), ("mf", "meanflow")]
    print(f"{'dataset':14}{'model':10}" + "".join(f"{n:>9} NFE" for n in (1, 2, 4)))
    for dataset in args.datasets:
        for model, sampler in rows:
            cells = []
            for steps in (1, 2, 4):
                values = [table[f"{dataset}-seed{s}"]["results"][model]["ratios"][
                    f"{sampler}-{steps}"] for s in args.seeds]  # fmt: skip
                median = statistics.median(values)
                mark = "*" if steps in TARGETS and median <= TARGETS[steps] else " "
                cells.append(f"{median:12.2f}{mark}")
            print(f"{dataset:14}{model:10}" + "".join(cells))
    print("(* meets the target)")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
