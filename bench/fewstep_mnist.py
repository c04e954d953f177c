"""Few-step guided MNIST (issue 13): the quality of 2-rectified flow against its training time.

With the shipped configs and the commands a user types, in ``--workdir``:

1. teacher: ``flowdiff fit --config mnist.yaml`` for ``--teacher-steps`` steps, a checkpoint every
   ``--every`` steps (a teacher there already is resumed with ``--ckpt_path last``);
2. couplings: ``flowdiff reflow`` of the last teacher at ``--guidance`` (``--num-pairs``, the
   ``--pair-sampler`` with ``--pair-steps`` steps);
3. 2-rectified flow: ``flowdiff fit --config mnist_reflow.yaml --init_from TEACHER`` for
   ``--student-steps`` steps, a checkpoint every ``--student-every`` steps;
4. ``flowdiff evaluate`` of every checkpoint in one protocol (``--num-samples`` guided samples a
   row, the same noise; MNIST's evaluator: FD on the MNIST classifier's features, class
   accuracy): each teacher at ``--guidance`` with Euler at 50 steps, the last teacher also at 1
   and 2; each student at w = 1 (its pairs carry the guidance) with Euler at 1 and 2 steps.

Also scores the pairs themselves (the last teacher with the pairs' sampler). Prints the curve
(FD and accuracy against training steps), each stage's wall time,
and the issue's targets: 1 or 2 steps at >= 95% accuracy with FD within 2x of the 50-step
teacher's. Draws the curve with ``--picture``. Finished stages and evaluations are kept in
``--workdir`` and not run again (their times are kept in ``times.json``). ``--samples`` draws the
last teacher's and student's samples from the same noise. Run by hand:

    python bench/fewstep_mnist.py [--workdir runs/fewstep-mnist] [--teacher-steps 1000]
        [--student-steps 1000] [--num-pairs 10000] [--picture docs/mnist_fewstep_curve.png]
        [--samples docs/mnist_fewstep_samples.png] [--json F]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from _timer import run_logged as run

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.val_check_interval", "100000", "--checkpoint.save_top_k", "-1"]  # fmt: skip


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """``{step: path}`` of the step-interval checkpoints Lightning wrote (``...-step=N.ckpt``)."""
    found = {}
    for path in (run_dir / "checkpoints").glob("*step=*.ckpt"):
        found[int(re.search(r"step=(\d+)", path.name).group(1))] = path
    return dict(sorted(found.items()))


def stage(times: dict, key: str, args: list, log: Path) -> None:
    """Run a stage; add its wall time to ``times``, kept in ``times.json`` beside ``log``."""
    times[key] = times.get(key, 0.0) + run(args, log)
    (log.parent / "times.json").write_text(json.dumps(times, indent=2) + "\n")


def evaluate(ckpt: Path, out: Path, steps, guidance: float, num: int, log: Path, extra=()) -> dict:
    """``flowdiff evaluate``'s rows (run once, then kept) as ``{steps: metrics}``; the floor."""
    if not (out / "metrics.json").exists():
        run(["evaluate", "--ckpt", ckpt, "--steps", steps, "--guidance", guidance, "--num-samples",
             num, *extra, "--nll", "false", "--wandb", "false", "--overwrite", "true",
             "--out", out], log)  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    return {"floor": report["floor"], "rows": {r["steps"]: r["metrics"] for r in report["rows"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/fewstep-mnist"))
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="teacher checkpoint interval")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--num-pairs", type=int, default=10000)
    parser.add_argument("--pair-sampler", default="midpoint")
    parser.add_argument("--pair-steps", type=int, default=5)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--student-every", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=1000, help="samples an evaluate row")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--picture", type=Path, default=None, help="draw the curve here")
    parser.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="draw the last teacher (50 steps) and student (1, 2 steps) from the same noise here",
    )
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "times.json"  # kept by stage()
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    teacher, student, pairs = work / "teacher", work / "student", work / "pairs.pt"

    done = max(checkpoints(teacher), default=0)
    if done < args.teacher_steps:
        resume = ["--ckpt_path", "last"] if (teacher / "checkpoints" / "last.ckpt").exists() else []
        stage(times, f"teacher fit {done}-{args.teacher_steps}",
              ["fit", "--config", "mnist.yaml", "--trainer.default_root_dir", teacher,
               "--trainer.max_steps", args.teacher_steps, "--checkpoint.every_n_train_steps",
               args.every, *QUIET, *resume], work / "teacher.log")  # fmt: skip
    teacher_ckpt = checkpoints(teacher)[args.teacher_steps]
    if not pairs.exists():
        stage(times, "reflow", ["reflow", "--ckpt", teacher_ckpt, "--num-pairs", args.num_pairs,
                                "--guidance", args.guidance, "--sampler", args.pair_sampler,
                                "--steps", args.pair_steps, "--out", pairs],
              work / "reflow.log")  # fmt: skip
    if max(checkpoints(student), default=0) < args.student_steps:
        stage(times, "2-RF fit",
              ["fit", "--config", "mnist_reflow.yaml", "--data.init_args.path", pairs,
               "--init_from", teacher_ckpt, "--trainer.default_root_dir", student,
               "--trainer.max_steps", args.student_steps, "--checkpoint.every_n_train_steps",
               args.student_every, *QUIET], work / "student.log")  # fmt: skip

    num, w = args.num_samples, args.guidance
    curve = {"teacher": {}, "student": {}}
    for step, ckpt in checkpoints(teacher).items():
        steps = "1,2,50" if step == args.teacher_steps else "50"
        out = work / "eval" / f"teacher-{step}"
        curve["teacher"][step] = evaluate(ckpt, out, steps, w, num, out.with_suffix(".log"))
    out = work / "eval" / f"teacher-{args.teacher_steps}-pairsampler"
    pairs_rows = evaluate(teacher_ckpt, out, args.pair_steps, w, num, out.with_suffix(".log"),
                          ["--sampler", args.pair_sampler])  # fmt: skip
    curve[f"pairs ({args.pair_sampler})"] = {args.teacher_steps: pairs_rows}
    for step, ckpt in checkpoints(student).items():
        out = work / "eval" / f"student-{step}"
        curve["student"][step] = evaluate(ckpt, out, "1,2", 1.0, num, out.with_suffix(".log"))
    report(curve, times, args)
    if args.samples:
        grids(teacher_ckpt, checkpoints(student)[args.student_steps], args, args.samples)


def report(curve: dict, times: dict, args) -> None:
    final = curve["teacher"][args.teacher_steps]
    floor, ref = final["floor"], final["rows"][50]
    print(f"\nfloor (data against data): FD {floor['fid']:.1f}, "
          f"accuracy {floor['class_accuracy']:.3f}")  # fmt: skip
    print(f"stage wall times (s): {json.dumps({k: round(v) for k, v in times.items()})}")
    print(f"{'model':18}{'trained':>8}{'sampler steps':>14}{'FD':>9}{'accuracy':>10}")
    for name, runs in curve.items():
        for step, result in runs.items():
            for steps, m in result["rows"].items():
                print(f"{name:18}{step:8d}{steps:14d}{m['fid']:9.1f}{m['class_accuracy']:10.3f}")
    last = curve["student"][args.student_steps]
    for nfe in (1, 2):
        m = last["rows"][nfe]
        met = m["class_accuracy"] >= 0.95 and m["fid"] <= 2 * ref["fid"]
        print(f"2-RF after {args.student_steps} steps at {nfe} NFE: accuracy "
              f"{m['class_accuracy']:.3f}, FD {m['fid']:.1f} "
              f"(teacher at 50 NFE: {ref['class_accuracy']:.3f}, FD {ref['fid']:.1f}); target "
              f"{'met' if met else 'not met'}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"curve": curve, "times": times}, indent=2) + "\n")
    if args.picture:
        picture(curve, args, args.picture)


def picture(curve: dict, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = curve["teacher"][args.teacher_steps]["rows"][50]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for ax, key, label in zip(axes, ("class_accuracy", "fid"), ("class accuracy", "FD"),
                              strict=True):  # fmt: skip
        t = curve["teacher"]
        ax.plot(list(t), [r["rows"][50][key] for r in t.values()], "o-", c="black",
                label=f"teacher, 50 NFE, w = {args.guidance:g} (x: its steps)")  # fmt: skip
        s = curve["student"]
        for nfe, color in ((1, "tab:orange"), (2, "tab:blue")):
            xs = [args.teacher_steps + step for step in s]
            ax.plot(xs, [r["rows"][nfe][key] for r in s.values()], "o-", c=color,
                    label=f"2-RF, {nfe} NFE (x: teacher + student steps)")  # fmt: skip
        pairs = curve[f"pairs ({args.pair_sampler})"][args.teacher_steps]["rows"][args.pair_steps]
        ax.axhline(pairs[key], ls=":", c="tab:green", label="the pairs (teacher, w = 3)")
        target = 0.95 if key == "class_accuracy" else 2 * ref[key]
        ax.axhline(target, ls="--", c="grey", label="target")
        ax.set(xlabel="training steps (mnist.yaml batch 250)", ylabel=label)
        if key == "fid":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("guided MNIST: few-step 2-rectified flow against training")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def grids(teacher_ckpt: Path, student_ckpt: Path, args, out: Path) -> None:
    """``flowdiff sample`` of teacher and student, 8 a class, from the same noise; side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    rows = ((teacher_ckpt, 50, args.guidance, f"teacher, 50 Euler steps, w = {args.guidance:g}"),
            (student_ckpt, 1, 1.0, "2-RF, 1 Euler step"),
            (student_ckpt, 2, 1.0, "2-RF, 2 Euler steps"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, (ckpt, steps, w, title) in zip(axes, rows, strict=True):
        grid = args.workdir / "grids" / f"{ckpt.parent.parent.name}-{steps}"
        if not (grid / "samples.png").exists():
            run(["sample", "--ckpt", ckpt, "--steps", steps, "--guidance", w, "--per-class", 8,
                 "--seed", 1, "--overwrite", "true", "--out", grid],
                grid.with_suffix(".log"))  # fmt: skip
        ax.imshow(mpimg.imread(grid / "samples.png"))
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    main()
