"""Sample quality of the shipped toy config: exact W2 against the data floor, at its own sampler.

For each dataset and seed, trains `flowdiff fit --config toy.yaml` as shipped (only the dataset
and the seeds changed: `--seed_everything S --data.init_args.seed S`), timing the whole command
(process start included), then draws 5,000 samples from `last.ckpt` (EMA weights) with the
checkpoint's own sampler and computes the exact W2 (POT) to 5,000 fresh data points. The floor is
the W2 between two independent 5,000-point data sets (drawn from seeds tied to S). One draw is
noisy: on 8 gaussians the floor of one draw swings from 0.146 to 0.226 with the seed (the points
per mode are multinomial), and data scored as a model gets 0.6x to 1.6x its floor. So each seed
takes the mean W2 and the mean floor over ``--draws`` independent draws (4; each its own samples,
reference and floor set) and their ratio. The table gives, per dataset, the medians over the seeds
of W2, floor, their ratio, the ratio of draw 0 alone (the protocol of earlier versions), the
ratio that fresh data scores in the model's place (a perfect model: the protocol's own noise) and
the fit's wall time, with the sampler's NFE. Run by hand (a few minutes a dataset on 2 CPU cores):

    python bench/toy_quality.py [--datasets moons 8gaussians checkerboard] [--seeds 0 1 2]
        [--draws 4] [--json out.json] [-- EXTRA FIT ARGUMENTS]

Arguments after ``--`` go to every `flowdiff fit` (e.g. today's figures of another recipe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N = 5000


def score(ckpt: Path, seed: int, draws: int) -> dict:
    """W2 and floor as means over ``draws`` independent draws (5,000 points each), and the ratio
    of the means; ``draw_ratios``: each draw's own ratio, what one draw alone would report."""
    from flowdiff.checkpoint import load_run
    from flowdiff.metrics import wasserstein2

    run = load_run(ckpt)
    w2s, floors, controls = [], [], []
    for k in range(draws):
        s = seed + 1000 * k  # draw 0 is the single draw of earlier versions of this bench
        result = run.model.sample(N, generator=torch.Generator().manual_seed(s))
        data, _ = run.datamodule.reference(N, seed=10_000 + s)
        other, _ = run.datamodule.reference(N, seed=20_000 + s)
        perfect, _ = run.datamodule.reference(N, seed=30_000 + s)  # data scored as a model
        w2s.append(wasserstein2(result.x, data))
        floors.append(wasserstein2(other, data))
        controls.append(wasserstein2(perfect, data))
    w2, floor = statistics.mean(w2s), statistics.mean(floors)
    return {"w2": w2, "floor": floor, "ratio": w2 / floor, "nfe": result.nfe,
            "draw_ratios": [a / b for a, b in zip(w2s, floors, strict=True)],
            "control_ratio": statistics.mean(controls) / floor,
            "sampler": repr(run.model.sampler)}  # fmt: skip


def fit(config: str, dataset: str, seed: int, root: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "flowdiff.cli", "fit", "--config", config,
           "--data.init_args.dataset", dataset, "--seed_everything", str(seed),
           "--data.init_args.seed", str(seed), "--trainer.default_root_dir", str(root),
           "--trainer.logger", "false", *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="toy.yaml")
    parser.add_argument("--datasets", nargs="+", default=["moons", "8gaussians", "checkerboard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=4, help="draws of 5,000 points per seed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs, table = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            for seed in args.seeds:
                root = Path(tmp) / f"{name}-{seed}"
                seconds = fit(args.config, name, seed, root, extra)
                r = {"dataset": name, "seed": seed, "fit_seconds": seconds,
                     **score(root / "checkpoints" / "last.ckpt", seed, args.draws)}  # fmt: skip
                runs.append(r)
                print(f"{name:13} seed {seed}  W2 {r['w2']:.4f}  floor {r['floor']:.4f}  "
                      f"ratio {r['ratio']:.3f}  data {r['control_ratio']:.3f}  NFE {r['nfe']}  "
                      f"fit {seconds:.0f} s  per draw "
                      f"{', '.join(f'{x:.2f}' for x in r['draw_ratios'])}",
                      flush=True)  # fmt: skip
            mine = [r for r in runs if r["dataset"] == name]
            table[name] = {key: statistics.median(r[key] for r in mine)
                           for key in ("w2", "floor", "ratio", "fit_seconds", "nfe")}  # fmt: skip
            table[name]["ratio_draw0"] = statistics.median(r["draw_ratios"][0] for r in mine)
            table[name]["control"] = statistics.median(r["control_ratio"] for r in mine)
    print(f"\nmedians over seeds {args.seeds}; sampler: {runs[0]['sampler']}")
    print(
        "| dataset | floor W2 | W2 | ratio | ratio, draw 0 alone | data as a model | NFE | "
        "fit (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, m in table.items():
        print(f"| {name} | {m['floor']:.4f} | {m['w2']:.4f} | **{m['ratio']:.2f}×** | "
              f"{m['ratio_draw0']:.2f}× | {m['control']:.2f}× | {m['nfe']:.0f} | "
              f"{m['fit_seconds']:.0f} |")  # fmt: skip
    if args.json:
        summary = {"config": args.config, "extra": extra, "median": table, "runs": runs}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
