"""Sample quality of the shipped toy config: exact W2 against the data floor, at its own sampler.

For each dataset and seed, trains `flowdiff fit --config toy.yaml` as shipped (only the dataset
and the seeds changed: `--seed_everything S --data.init_args.seed S`), timing the whole command
(process start included), then draws 5,000 samples from `last.ckpt` (EMA weights) with the
checkpoint's own sampler and computes the exact W2 (POT) to 5,000 fresh data points. The floor is
the W2 between two independent 5,000-point data sets. One draw is noisy: on 8 gaussians the
per-draw ratio of a perfect model to the floor has a standard deviation of 0.29 (the points per
mode are multinomial), so a mean over 8 draws is still +-0.1. So each model takes the mean W2 over
``--draws`` draws (32; draw k: noise seed k, its own reference set) against the mean floor of the
same draws, and every model of a dataset meets the same draws (common random numbers: seeds
differ by their training only). Two controls score what a perfect model gets, the protocol's own
noise: "data as a model", a third data set per draw; and on 8 gaussians, a Gaussian mixture, the
exact field (MATH.md) integrated by the checkpoint's sampler from the same noise as the model,
whose difference from the model is the model's error alone. The table gives, per dataset, the
medians over the seeds of W2, floor, their ratio and the fit's wall time, with the sampler's NFE.
The W2s of a model run in parallel processes, one per core. Run by hand (~8 minutes a dataset
on 2 CPU cores):

    python bench/toy_quality.py [--datasets moons 8gaussians checkerboard] [--seeds 0 1 2]
        [--draws 32] [--json out.json] [-- EXTRA FIT ARGUMENTS]

Arguments after ``--`` go to every `flowdiff fit` (e.g. today's figures of another recipe).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

N = 5000


def _w2(pair) -> float:
    from flowdiff.metrics import wasserstein2

    torch.set_num_threads(1)
    return wasserstein2(*pair)


def w2s(pool, xs: list, ys: list) -> list[float]:
    """Exact W2 of each pair ``(xs[k], ys[k])``, in the pool's processes."""
    return list(pool.map(_w2, zip(xs, ys, strict=True)))


def floors(pool, datamodule, draws: int) -> dict:
    """The data's side of the protocol, the same for every model of a dataset: draw k's reference
    (seed 10,000 + 1,000 k), its floor (W2 of another data set to it) and the W2 of a third data
    set, scored as a model would be (a perfect model)."""

    def sets(offset):
        return [datamodule.reference(N, seed=offset + 1000 * k)[0] for k in range(draws)]

    refs = sets(10_000)
    return {"refs": refs, "floor": w2s(pool, sets(20_000), refs),
            "control": w2s(pool, sets(30_000), refs)}  # fmt: skip


def exact_field(name: str, path):
    """The data's exact field when it is a Gaussian mixture (8 gaussians); else None."""
    if name != "8gaussians":
        return None
    from flowdiff.data.toy import eight_gaussians_mixture
    from flowdiff.testing import GaussianMixtureField

    return GaussianMixtureField(path, *eight_gaussians_mixture())


def score(pool, ckpt: Path, name: str, data: dict | None, draws: int) -> tuple[dict, dict]:
    """Mean W2 of the model over the draws (5,000 samples each, noise seed k) against the mean
    floor, and their ratio, with the exact field's ratio on the same noise where there is one
    (computed once a dataset, kept in ``data``); ``data``: :func:`floors` of the dataset (None:
    computed here)."""
    from flowdiff.checkpoint import load_run

    run = load_run(ckpt)
    data = data or floors(pool, run.datamodule, draws)
    model, path, sampler = run.model, run.model.path, run.model.sampler
    noise = [model.noise(N, torch.Generator().manual_seed(k)) for k in range(draws)]
    result = [model.sample(N, x_0=x_0) for x_0 in noise]
    w2 = w2s(pool, [r.x for r in result], data["refs"])
    floor = statistics.mean(data["floor"])
    ratios = [a / b for a, b in zip(w2, data["floor"], strict=True)]
    scores = {"w2": statistics.mean(w2), "floor": floor, "ratio": statistics.mean(w2) / floor,
              "nfe": result[0].nfe, "draw_ratios": ratios,
              "control_ratio": statistics.mean(data["control"]) / floor,
              "exact_ratio": None, "sampler": repr(sampler)}  # fmt: skip
    field = exact_field(name, path)
    if field is not None and "exact" not in data:  # the same noise and sampler for every seed
        with torch.no_grad():
            exact = [sampler.sample(field, x_0, path.t_min, 1.0).x for x_0 in noise]
        data["exact"] = w2s(pool, exact, data["refs"])
    if field is not None:
        scores["exact_ratio"] = statistics.mean(data["exact"]) / floor
    return scores, data


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
    parser.add_argument("--draws", type=int, default=32, help="draws of 5,000 points per model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs, table = [], {}
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that ran torch's threads
    with (tempfile.TemporaryDirectory() as tmp,
          ProcessPoolExecutor(os.cpu_count(), mp_context=spawn) as pool):  # fmt: skip
        for name in args.datasets:
            data = None  # the data's draws, shared by the dataset's models
            for seed in args.seeds:
                root = Path(tmp) / f"{name}-{seed}"
                seconds = fit(args.config, name, seed, root, extra)
                scores, data = score(
                    pool, root / "checkpoints" / "last.ckpt", name, data, args.draws
                )
                r = {"dataset": name, "seed": seed, "fit_seconds": seconds, **scores}
                runs.append(r)
                exact = f"  exact field {r['exact_ratio']:.3f}" if r["exact_ratio"] else ""
                print(f"{name:13} seed {seed}  W2 {r['w2']:.4f}  floor {r['floor']:.4f}  "
                      f"ratio {r['ratio']:.3f}  data {r['control_ratio']:.3f}{exact}  "
                      f"NFE {r['nfe']}  fit {seconds:.0f} s  per draw "
                      f"{min(r['draw_ratios']):.2f} to {max(r['draw_ratios']):.2f}",
                      flush=True)  # fmt: skip
            mine = [r for r in runs if r["dataset"] == name]
            table[name] = {key: statistics.median(r[key] for r in mine)
                           for key in ("w2", "floor", "ratio", "fit_seconds", "nfe")}  # fmt: skip
            table[name]["control"] = mine[0]["control_ratio"]
            table[name]["per_seed"] = [r["ratio"] for r in mine]
            exact = [r["exact_ratio"] for r in mine if r["exact_ratio"]]
            table[name]["exact"] = statistics.median(exact) if exact else None
    print(f"\nmedians over seeds {args.seeds}; sampler: {runs[0]['sampler']}")
    print(
        "| dataset | floor W2 | W2 | ratio | per seed | data as a model | exact field | NFE "
        "| fit (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in table.items():
        exact = f"{m['exact']:.2f}×" if m["exact"] else "–"
        print(f"| {name} | {m['floor']:.4f} | {m['w2']:.4f} | **{m['ratio']:.2f}×** | "
              f"{', '.join(f'{x:.2f}' for x in m['per_seed'])} | {m['control']:.2f}× | "
              f"{exact} | {m['nfe']:.0f} | "
              f"{m['fit_seconds']:.0f} |")  # fmt: skip
    if args.json:
        summary = {"config": args.config, "extra": extra, "median": table, "runs": runs}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
