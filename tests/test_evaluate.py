"""``flowdiff evaluate`` on tiny toy runs: plumbing. The rows are recomputed with the same metric
functions (seeds, chunks, labels, floor, ranks); the metrics themselves are tested against closed
forms in test_metrics.py and test_image_metrics.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowdiff.checkpoint import load_run
from flowdiff.data.evaluators import BANDWIDTHS, FLOOR_SEED, NLL_SEED, REFERENCE_SEED
from flowdiff.evaluate.sharding import chunk_generator
from flowdiff.likelihood import log_likelihood
from flowdiff.metrics.points import mmd, wasserstein2
from flowdiff.samplers import (
    Dopri5Sampler,
    EDMGrid,
    HeunSampler,
    RK4Sampler,
    ShiftGrid,
    UniformGrid,
    get_sampler,
)

TINY = [
    "--trainer.max_steps", "20",
    "--trainer.val_check_interval", "20",
    "--trainer.logger", "false",
    "--data.init_args.batches_per_epoch", "20",
    "--data.init_args.batch_size", "64",
    "--validation.num_samples", "100",
    "--model.net.init_args.hidden", "32",
]  # fmt: skip
CONDITIONAL = [
    "--model.net.init_args.num_classes", "8",
    "--data.init_args.p_uncond", "0.2",
    "--data.init_args.dataset", "8gaussians",
]  # fmt: skip
SMALL = ["--num-samples", "120", "--batch-size", "50", "--nll-samples", "60", "--nll-steps", "3"]


@pytest.fixture(scope="module")
def toy_ckpts(tmp_path_factory):
    from flowdiff.cli import main

    ckpts = {}
    for name, extra in (("toy", []), ("toy_cfg", CONDITIONAL)):
        root = tmp_path_factory.mktemp(name) / "run"
        main(
            ["fit", "--config", "toy.yaml", "--trainer.default_root_dir", str(root), *TINY, *extra]
        )
        ckpts[name] = root / "checkpoints" / "last.ckpt"
    return ckpts


def evaluate(run_cli, ckpt, out, *args):
    return run_cli("evaluate", "--ckpt", ckpt, "--out", out, *SMALL, *args)


def expected_row(model, steps, name, n, size, seed, reference, y=None, guidance=None,
                 interval=None, nfe=None):  # fmt: skip
    """A row's metrics from the protocol's definition: chunk c has the noise of seed
    ``seed * 1000003 + c``; samples against the fixed reference. ``name`` may be a sampler;
    ``nfe``, a list, receives each chunk's NFE."""
    sampler = get_sampler(name, steps) if isinstance(name, str) else name
    parts = []
    for c, lo in enumerate(range(0, n, size)):
        hi = min(n, lo + size)
        labels = y[lo:hi] if y is not None else None
        result = model.sample(hi - lo, sampler, labels, guidance, chunk_generator(seed, c),
                              guidance_interval=interval)  # fmt: skip
        parts.append(result.x)
        if nfe is not None:
            nfe.append(result.nfe)
    samples = torch.cat(parts)
    return {"w2": wasserstein2(samples, reference), "mmd": mmd(samples, reference, BANDWIDTHS)}


def test_sweep_plumbing_follows_the_protocol(toy_ckpts, run_cli, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = evaluate(
        run_cli, toy_ckpts["toy"], out, "--sampler", "euler,heun", "--steps", "2,5", "--seed", "3"
    )
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    rows = report["rows"]
    assert [(r["name"], r["steps"], r["nfe"]) for r in rows] == [
        ("euler", 2, 2),
        ("euler", 5, 5),
        ("heun", 2, 3),
        ("heun", 5, 9),
    ]
    run = load_run(toy_ckpts["toy"])
    dm, n = run.datamodule, 120
    reference = dm.reference(n, REFERENCE_SEED)[0]
    for r in rows:
        expected = expected_row(run.model, r["steps"], r["name"], n, 50, 3, reference)
        assert r["metrics"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert r["guidance"] is None and r["seconds"] >= 0
    floor = {
        "w2": wasserstein2(dm.reference(n, FLOOR_SEED)[0], reference),
        "mmd": mmd(dm.reference(n, FLOOR_SEED)[0], reference, BANDWIDTHS),
    }
    assert report["floor"] == pytest.approx(floor, rel=1e-12)
    # NLL: the exact-divergence ODE on the protocol's fresh points, unconditional model.
    x = dm.reference(60, NLL_SEED)[0]
    parts = [
        log_likelihood(
            run.model.field(),
            x[lo : lo + 50],
            solver=RK4Sampler(3),
            generator=chunk_generator(NLL_SEED, c),
        ).log_prob
        for c, lo in enumerate(range(0, 60, 50))
    ]
    nll = -torch.cat(parts).double().mean().item()
    assert report["likelihood"]["nll"] == pytest.approx(nll, rel=1e-6)
    # The table printed with the protocol, the floor row and the likelihood.
    assert "protocol:" in stdout and f"seed {REFERENCE_SEED}" in stdout
    assert "heun" in stdout and "data (seed" in stdout and "NLL" in stdout
    for name in ("quality_vs_nfe.png", "quality_vs_guidance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guidance_sweep_plumbing_of_a_conditional_model(toy_ckpts, run_cli, tmp_path):
    out = tmp_path / "eval"
    code, _, err = evaluate(
        run_cli,
        toy_ckpts["toy_cfg"],
        out,
        "--guidance",
        "0,1,2.5",
        "--sampler",
        "euler",
        "--steps",
        "3",
        "--nll",
        "false",
    )
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    assert [r["guidance"] for r in report["rows"]] == [0.0, 1.0, 2.5]
    assert report["likelihood"] is None
    run = load_run(toy_ckpts["toy_cfg"])
    # Guided samples ask for the reference's own labels, so class frequencies match the data.
    reference, labels = run.datamodule.reference(120, REFERENCE_SEED)
    row = report["rows"][2]
    expected = expected_row(run.model, 3, "euler", 120, 50, 0, reference, labels, 2.5)
    assert row["metrics"] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_grid_and_tolerance_sweep(toy_ckpts, run_cli, tmp_path):
    """One row per grid for the fixed-grid sampler, one per tolerance for dopri5 (whose NFE is
    measured: the largest of any chunk), each recomputed from the protocol."""
    out = tmp_path / "eval"
    code, stdout, err = evaluate(
        run_cli, toy_ckpts["toy"], out, "--sampler", "heun,dopri5", "--steps", "3",
        "--grid", "uniform,edm,shift:3", "--atol", "1e-3,1e-5", "--nll", "false",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [(r["name"], r["steps"], r["grid"], r["atol"]) for r in rows] == [
        ("heun", 3, "uniform", None),
        ("heun", 3, "edm:7", None),
        ("heun", 3, "shift:3", None),
        ("dopri5", None, None, 1e-3),
        ("dopri5", None, None, 1e-5),
    ]
    assert [r["nfe"] for r in rows[:3]] == [5, 5, 5]
    run = load_run(toy_ckpts["toy"])
    reference = run.datamodule.reference(120, REFERENCE_SEED)[0]
    samplers = [
        *(HeunSampler(3, grid) for grid in (UniformGrid(), EDMGrid(), ShiftGrid())),
        Dopri5Sampler(1e-3, 1e-5),
        Dopri5Sampler(1e-5, 1e-5),
    ]
    for r, sampler in zip(rows, samplers, strict=True):
        assert r["sampler"] == repr(sampler)
        nfe: list[int] = []
        expected = expected_row(run.model, None, sampler, 120, 50, 0, reference, nfe=nfe)
        assert r["metrics"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert r["nfe"] == max(nfe)
    assert rows[4]["nfe"] > rows[3]["nfe"]
    assert "grid" in stdout and "edm:7" in stdout and "dopri5 (tol 1e-05)" in stdout


def test_guidance_interval_sweep(toy_ckpts, run_cli, tmp_path):
    """One row per interval for each guided scale; w = 1 guides nothing and gets one row."""
    out = tmp_path / "eval"
    code, stdout, err = evaluate(
        run_cli, toy_ckpts["toy_cfg"], out, "--guidance", "1,2.5", "--sampler", "euler",
        "--steps", "4", "--guidance-interval", "0,1", "0.3,0.7", "--nll", "false",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [(r["guidance"], r["guidance_interval"], r["nfe"]) for r in rows] == [
        (1.0, None, 4),
        (2.5, [0.0, 1.0], 4),
        (2.5, [0.3, 0.7], 4),
    ]
    run = load_run(toy_ckpts["toy_cfg"])
    reference, labels = run.datamodule.reference(120, REFERENCE_SEED)
    plain = expected_row(run.model, 4, "euler", 120, 50, 0, reference, labels, 2.5)
    limited = expected_row(run.model, 4, "euler", 120, 50, 0, reference, labels, 2.5, (0.3, 0.7))
    assert rows[1]["metrics"] == pytest.approx(plain, rel=1e-6, abs=1e-9)
    assert rows[2]["metrics"] == pytest.approx(limited, rel=1e-6, abs=1e-9)
    assert rows[2]["metrics"] != pytest.approx(rows[1]["metrics"], rel=1e-3)
    assert "t interval" in stdout and "0.3-0.7" in stdout


def test_writes_a_wandb_run_offline(toy_ckpts, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "eval"
    code, stdout, err = evaluate(run_cli, toy_ckpts["toy"], out, "--steps", "2", "--wandb", "true")
    assert code == 0, err
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert f"wandb sync {runs[0]}" in stdout


def test_compare_draws_earlier_evaluations_beside_this_one(toy_ckpts, run_cli, tmp_path):
    """--compare: the NFE plot gets a line per sampler setting of each run (colour: setting,
    style: run); a run with another data floor is left out with a line; another protocol, or a
    file that is not an evaluation, is refused before any work."""
    from flowdiff.evaluate.report import Report

    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    quiet = ["--wandb", "false", "--nll", "false"]
    assert evaluate(run_cli, toy_ckpts["toy"], first, "--sampler", "euler", "--steps", "2,4",
                    *quiet)[0] == 0  # fmt: skip
    assert evaluate(run_cli, toy_ckpts["toy_cfg"], other, "--steps", "2", *quiet)[0] == 0
    code, stdout, err = evaluate(run_cli, toy_ckpts["toy"], second, "--sampler", "heun",
                                 "--steps", "2,4", "--compare", f"{first},{other}/metrics.json",
                                 *quiet)  # fmt: skip
    assert code == 0, err
    assert "is not drawn beside this evaluation: data floor" in stdout  # the 8 gaussians run
    assert (second / "quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    this = Report.read(second)
    this.columns = load_run(toy_ckpts["toy"]).datamodule.evaluator().columns
    compared = this.comparable([Report.read(first), Report.read(other)], say=lambda m: None)
    assert [r.run_name for r in compared] == ["run"]
    ax = this.figures(compared)["quality_vs_nfe"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"run: heun", "run: euler", "data floor"}
    assert list(lines["run: euler"].get_xdata()) == [2, 4]  # NFE of the first evaluation
    assert lines["run: heun"].get_linestyle() != lines["run: euler"].get_linestyle()
    # Refused before any work, nothing written.
    for compare, message in ((tmp_path / "missing", "is not a metrics.json"),
                             (first, "another protocol (samples a row differ)")):  # fmt: skip
        code, _, err = evaluate(run_cli, toy_ckpts["toy"], tmp_path / "no", "--compare",
                                compare, "--num-samples", "60", *quiet)  # fmt: skip
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "no").exists()


def test_refuses_to_overwrite(toy_ckpts, run_cli, tmp_path):
    out = tmp_path / "eval"
    assert evaluate(run_cli, toy_ckpts["toy"], out, "--steps", "2", "--wandb", "false")[0] == 0
    before = (out / "metrics.json").read_bytes()
    code, _, err = evaluate(run_cli, toy_ckpts["toy"], out, "--steps", "3", "--wandb", "false")
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert (out / "metrics.json").read_bytes() == before
    code, _, err = evaluate(
        run_cli, toy_ckpts["toy"], out, "--steps", "3", "--wandb", "false", "--overwrite", "true"
    )
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["rows"][0]["steps"] == 3


@pytest.mark.parametrize(
    "run, args, message",
    [
        ("toy", ["--guidance", "3"], "trained without labels"),
        ("toy_cfg", ["--guidance", "-1"], "expected a non-negative number"),
        ("toy", ["--steps", "0"], "positive"),
        ("toy", ["--steps", "ten"], "steps: Not of type PositiveInt"),
        ("toy", ["--sampler", "rk45"], "unknown sampler"),
        ("toy", ["--num-samples", "0"], "num_samples: expected a positive integer"),
        ("toy", ["--batch-size", "-2"], "batch_size: expected a positive integer"),
        ("toy", ["--devices", "0"], "devices"),
    ],
)
def test_bad_input_is_one_line_before_any_work(toy_ckpts, run_cli, tmp_path, run, args, message):
    code, _, err = evaluate(run_cli, toy_ckpts[run], tmp_path / "eval", *args)
    assert code == 2 and err.startswith("flowdiff: error:") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "eval").exists()


def test_two_ranks_give_the_metrics_of_one(toy_ckpts, tmp_path):
    """Launched on 2 CPU ranks (gloo) by Fabric, each draws its chunks; the same numbers. With
    dopri5 the ranks take different numbers of steps (they meet only once a row, at the end),
    and the NFE reported is the largest of any chunk on any rank."""
    # Chunks 0 and 2 are rank 0's, chunk 1 rank 1's: a seed where chunk 1 takes the most steps.
    model = load_run(toy_ckpts["toy"]).model

    def chunk_nfe(seed):
        return [model.sample(hi - lo, Dopri5Sampler(), generator=chunk_generator(seed, c)).nfe
                for c, (lo, hi) in enumerate([(0, 50), (50, 100), (100, 120)])]  # fmt: skip

    seed = next(s for s in range(50) if (n := chunk_nfe(s))[1] > max(n[0], n[2]))
    nfe = chunk_nfe(seed)
    flowdiff = Path(sys.executable).parent / "flowdiff"
    common = [
        str(flowdiff), "evaluate", "--ckpt", str(toy_ckpts["toy"]), *SMALL, "--seed", str(seed),
        "--sampler", "euler,euler-maruyama,dopri5", "--steps", "3", "--wandb", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = []
    for devices in ("1", "2"):
        out = tmp_path / f"ranks{devices}"
        cmd = [*common, "--devices", devices, "--accelerator", "cpu", "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        reports.append(json.loads((out / "metrics.json").read_text()))
    one, two = reports
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-9)
        assert a["nfe"] == b["nfe"]
    assert [r["name"] for r in two["rows"]] == ["euler", "euler-maruyama", "dopri5"]
    assert two["rows"][2]["nfe"] == nfe[1] and two["rows"][2]["steps"] is None
    assert one["likelihood"]["nll"] == pytest.approx(two["likelihood"]["nll"], rel=1e-9)
    assert one["floor"] == two["floor"]
