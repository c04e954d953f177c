"""Sample quality of the shipped toy config: exact W2 against the data floor, at its own sampler.

For each dataset and seed, trains `flowdiff fit --config toy.yaml` as shipped (only the dataset
and the seeds changed: `--seed_everything S --data.init_args.seed S`), timing the whole command
(process start included), then draws 5,000 samples from `last.ckpt` (EMA weights) with the
checkpoint's own sampler and computes the exact W2 (POT) to 5,000 fresh data points. The floor is
the W2 between two independent 5,000-point data sets. One draw is noisy: on 8 gaussians the floor
of one draw swings from 0.146 to 0.226 with the seed (the points per mode are multinomial), and
data scored as a model gets 0.6x to 1.6x its floor. So each model takes the mean W2 over
``--draws`` draws (8; draw k: noise seed k, its own reference set) against the mean floor of the
same draws, and every model of a dataset meets the same draws (common random numbers: seeds
differ by their training only). "data as a model" is a third data set scored like a model: the
ratio a perfect model gets, the protocol's own noise. The table gives, per dataset, the medians
over the seeds of W2, floor, their ratio and the fit's wall time, with the sampler's NFE. Run by
hand (a few minutes a dataset on 2 CPU cores):

    python bench/toy_quality.py [--datasets moons 8gaussians checkerboard] [--seeds 0 1 2]
        [--draws 8] [--json out.json] [-- EXTRA FIT ARGUMENTS]

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


def floors(datamodule, draws: int) -> dict:
    """The data's side of the protocol, the same for every model of a dataset: draw k's reference
    (seed 10,000 + 1,000 k), its floor (W2 of another data set to it) and the W2 of a third data
    set, scored as a model would be (a perfect model)."""
    from flowdiff.metrics import wasserstein2

    refs, floor, control = [], [], []
    for k in range(draws):
        data, _ = datamodule.reference(N, seed=10_000 + 1000 * k)
        other, _ = datamodule.reference(N, seed=20_000 + 1000 * k)
        perfect, _ = datamodule.reference(N, seed=30_000 + 1000 * k)
        refs.append(data)
        floor.append(wasserstein2(other, data))
        control.append(wasserstein2(perfect, data))
    return {"refs": refs, "floor": floor, "control": control}


def score(ckpt: Path, data: dict | None, draws: int) -> tuple[dict, dict]:
    """Mean W2 of the model over the draws (5,000 samples each, noise seed k) against the mean
    floor, and their ratio; ``data``: :func:`floors` of the dataset (None: computed here)."""
    from flowdiff.checkpoint import load_run
    from flowdiff.metrics import wasserstein2

    run = load_run(ckpt)
    data = data or floors(run.datamodule, draws)
    w2s = []
    for k in range(draws):
        result = run.model.sample(N, generator=torch.Generator().manual_seed(k))
        w2s.append(wasserstein2(result.x, data["refs"][k]))
    w2, floor = statistics.mean(w2s), statistics.mean(data["floor"])
    return {"w2": w2, "floor": floor, "ratio": w2 / floor, "nfe": result.nfe,
            "draw_ratios": [a / b for a, b in zip(w2s, data["floor"], strict=True)],
            "control_ratio": statistics.mean(data["control"]) / floor,
            "sampler": repr(run.model.sampler)}, data  # fmt: skip


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
    parser.add_argument("--draws", type=int, default=8, help="draws of 5,000 points per model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs, table = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = None  # the data's draws, shared by the dataset's models
            for seed in args.seeds:
                root = Path(tmp) / f"{name}-{seed}"
                seconds = fit(args.config, name, seed, root, extra)
                scores, data = score(root / "checkpoints" / "last.ckpt", data, args.draws)
                r = {"dataset": name, "seed": seed, "fit_seconds": seconds, **scores}
                runs.append(r)
                print(f"{name:13} seed {seed}  W2 {r['w2']:.4f}  floor {r['floor']:.4f}  "
                      f"ratio {r['ratio']:.3f}  data {r['control_ratio']:.3f}  NFE {r['nfe']}  "
                      f"fit {seconds:.0f} s  per draw "
                      f"{', '.join(f'{x:.2f}' for x in r['draw_ratios'])}",
                      flush=True)  # fmt: skip
            mine = [r for r in runs if r["dataset"] == name]
            table[name] = {key: statistics.median(r[key] for r in mine)
                           for key in ("w2", "floor", "ratio", "fit_seconds", "nfe")}  # fmt: skip
            table[name]["control"] = mine[0]["control_ratio"]
            table[name]["per_seed"] = [r["ratio"] for r in mine]
    print(f"\nmedians over seeds {args.seeds}; sampler: {runs[0]['sampler']}")
    print("| dataset | floor W2 | W2 | ratio | per seed | data as a model | NFE | fit (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in table.items():
        print(f"| {name} | {m['floor']:.4f} | {m['w2']:.4f} | **{m['ratio']:.2f}×** | "
              f"{', '.join(f'{x:.2f}' for x in m['per_seed'])} | {m['control']:.2f}× | "
              f"{m['nfe']:.0f} | "
              f"{m['fit_seconds']:.0f} |")  # fmt: skip
    if args.json:
        summary = {"config": args.config, "extra": extra, "median": table, "runs": runs}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
