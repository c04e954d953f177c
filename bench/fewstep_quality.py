"""Few-step generation on 2D data (issue 13): W2 at 1, 2 and 4 NFE against the data floor.

For each dataset and seed, with the shipped configs and the commands a user types:

1. teacher: ``flowdiff fit --config toy.yaml`` with ``--teacher-args`` (by default the documented
   flags: version 0.1's recipe, 20,000 steps at lr 1e-3, Euler 100 steps);
2. couplings: ``flowdiff reflow`` of the teacher (``--num-pairs``, RK4 with 25 steps);
3. 2-rectified flow: ``flowdiff fit --config toy_reflow.yaml --init_from TEACHER`` (10,000 steps);
4. MeanFlow from scratch: ``flowdiff fit --config toy_meanflow.yaml`` (20,000 steps);
5. ``flowdiff evaluate`` of each: the teacher with Euler at 1, 2, 4 and 100 steps, 2-RF with Euler
   at 1, 2, 4, MeanFlow with its sampler at 1, 2, 4 (evaluate's protocol: 5,000 samples against
   5,000 held-out points, exact W2; the floor is data against data; no likelihood).

Prints W2 / floor per model and NFE (the median over seeds) and each stage's wall time, and
checks the issue's target: one step <= 1.5x and two steps <= 1.2x the floor. Run by hand.
``--jobs 2`` runs two datasets/seeds at once, one thread each; ``--methods rf2`` leaves MeanFlow
out; ``--max-steps`` shortens every training for a dry run. Finished stages are kept in
``--workdir`` and not run again.

    python bench/fewstep_quality.py [--datasets moons 8gaussians checkerboard] [--seeds 0 1 2]
        [--methods rf2 mf] [--jobs 2] [--num-pairs 100000] [--workdir runs/fewstep] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _timer import run_logged as run

TARGETS = {1: 1.5, 2: 1.2}
# The teacher of docs/guides/fewstep.md: version 0.1's toy.yaml (CFM, Adam's default betas).
TEACHER = (
    "--trainer.max_steps 20000 --trainer.val_check_interval 10000 "
    "--model.optimizer.init_args.lr 0.001 "
    "--model.sampler.class_path flowdiff.samplers.EulerSampler --model.sampler.init_args.steps 100 "
    "--model.objective flowdiff.objectives.ConditionalFlowMatching "
    "--model.optimizer.init_args.betas [0.9,0.999]"
)


def ratios(metrics_json: Path) -> dict:
    """``{(sampler, steps): W2 / floor}`` of an evaluate output, and the floor."""
    report = json.loads(metrics_json.read_text())
    floor = report["floor"]["w2"]
    rows = {f"{r['name']}-{r['steps']}": r["metrics"]["w2"] / floor for r in report["rows"]}
    return {"floor": floor, "ratios": rows, "straightness": report["straightness"]["straightness"]}


def one(
    dataset: str,
    seed: int,
    work: Path,
    num_pairs: int,
    max_steps: int | None,
    teacher_args: list[str],
    methods: list[str],
) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    common = ["--seed_everything", seed, "--trainer.logger", "false"]
    common += ["--trainer.max_steps", max_steps] if max_steps else []
    ckpt = {name: work / name / "checkpoints" / "last.ckpt" for name in ("teacher", "rf2", "mf")}
    pairs = work / "pairs.pt"
    times = {}
    if not ckpt["teacher"].exists():
        times["teacher fit"] = run(["fit", "--config", "toy.yaml", "--data.init_args.dataset",
                                    dataset, "--trainer.default_root_dir", work / "teacher",
                                    *teacher_args, *common], work / "teacher.log")  # fmt: skip
    if "rf2" in methods and not pairs.exists():
        times["reflow"] = run(["reflow", "--ckpt", ckpt["teacher"], "--num-pairs", num_pairs,
                               "--sampler", "rk4", "--steps", 25, "--seed", seed,
                               "--out", pairs], work / "reflow.log")  # fmt: skip
    if "rf2" in methods and not ckpt["rf2"].exists():
        times["2-RF fit"] = run(["fit", "--config", "toy_reflow.yaml", "--data.init_args.path",
                                 pairs, "--init_from", ckpt["teacher"],
                                 "--trainer.default_root_dir", work / "rf2", *common],
                                work / "rf2.log")  # fmt: skip
    if "mf" in methods and not ckpt["mf"].exists():
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
        if name != "teacher" and name not in methods:
            continue
        out = work / name / "eval"
        if (out / "metrics.json").exists():
            results[name] = ratios(out / "metrics.json")
            continue
        times[f"{name} evaluate"] = run(["evaluate", "--ckpt", ckpt[name], *sweep, "--nll",
                                         "false", "--wandb", "false", "--overwrite", "true",
                                         "--out", out], work / f"{name}-eval.log")  # fmt: skip
        results[name] = ratios(out / "metrics.json")
    return {"results": results, "seconds": times}


def picture(work: Path, out: Path, num: int = 2000, lines: int = 64) -> None:
    """Trajectories of the teacher and of its 2-RF student from the same noise, side by side
    (RK4, 25 steps each: the paths the fields draw, not a few-step approximation of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from flowdiff.checkpoint import load_run
    from flowdiff.samplers import RK4Sampler

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    for ax, name in zip(axes, ("teacher", "rf2"), strict=True):
        run = load_run(work / name / "checkpoints" / "last.ckpt")
        data = run.datamodule.reference(num, seed=1)[0]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            result = run.model.sample(
                num, RK4Sampler(steps=25), generator=generator, return_trajectory=True
            )
        x, path = result.x, result.trajectory[:, :lines]
        straight = ratios(work / name / "eval" / "metrics.json")["straightness"]
        ax.scatter(data[:, 0], data[:, 1], s=2, c="tab:blue", alpha=0.2, label="data")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:orange", alpha=0.4, label="samples")
        ax.plot(path[:, :, 0], path[:, :, 1], lw=0.7, c="black", alpha=0.6)
        ax.scatter(path[0, :, 0], path[0, :, 1], s=6, c="grey", zorder=3)
        label = {"teacher": "teacher", "rf2": "2-rectified flow"}[name]
        ax.set(xlim=(-4, 4), ylim=(-4, 4), aspect="equal")
        ax.set_title(f"{label}: straightness {straight:.3g}")
        ax.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.suptitle(f"{work.name}: paths from the same noise (grey) to samples, RK4 25 steps")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["moons", "8gaussians", "checkerboard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=["rf2", "mf"], default=["rf2", "mf"])
    parser.add_argument("--teacher-args", default=TEACHER, help="fit flags for the teacher")
    parser.add_argument("--num-pairs", type=int, default=100_000)
    parser.add_argument("--max-steps", type=int, default=None, help="Shorter trainings (dry run).")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, 1 thread each")
    parser.add_argument("--workdir", type=Path, default=Path("runs/fewstep"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--picture",
        type=Path,
        default=None,
        help="draw the first dataset and seed's trajectories, teacher against 2-RF, here",
    )
    args = parser.parse_args()
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    teacher_args = args.teacher_args.split()
    runs = [(d, s) for d in args.datasets for s in args.seeds]

    def job(run: tuple[str, int]) -> dict:
        dataset, seed = run
        work = args.workdir / f"{dataset}-seed{seed}"
        result = one(
            dataset, seed, work, args.num_pairs, args.max_steps, teacher_args, args.methods
        )
        print(f"{dataset} seed {seed}: {json.dumps(result)}", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        table = {f"{d}-seed{s}": r for (d, s), r in zip(runs, pool.map(job, runs), strict=True)}
    print("\nW2 / data floor, median over seeds (target: 1 NFE <= 1.5, 2 NFE <= 1.2)")
    rows = [("teacher", "euler")] + [
        (m, {"rf2": "euler", "mf": "meanflow"}[m]) for m in args.methods
    ]
    print(f"{'dataset':14}{'model':10}" + "".join(f"{n:>9} NFE" for n in (1, 2, 4, 100)))
    for dataset in args.datasets:
        for model, sampler in rows:
            cells = []
            for steps in (1, 2, 4, 100):
                key = f"{sampler}-{steps}"
                values = [table[f"{dataset}-seed{s}"]["results"][model]["ratios"].get(key)
                          for s in args.seeds]  # fmt: skip
                if None in values:
                    cells.append(f"{'-':>13}")
                    continue
                median = statistics.median(values)
                mark = "*" if steps in TARGETS and median <= TARGETS[steps] else " "
                cells.append(f"{median:12.2f}{mark}")
            print(f"{dataset:14}{model:10}" + "".join(cells))
    print("(* meets the target)")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    if args.picture and "rf2" in args.methods:
        picture(args.workdir / f"{args.datasets[0]}-seed{args.seeds[0]}", args.picture)


if __name__ == "__main__":
    main()
