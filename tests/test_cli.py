"""End-to-end CLI: fit a tiny run from each shipped toy config, sample from it, bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = [
    "--trainer.max_steps",
    "30",
    "--trainer.val_check_interval",
    "15",
    "--trainer.logger",
    "false",
    "--data.init_args.batches_per_epoch",
    "30",
    "--data.init_args.batch_size",
    "64",
    "--validation.num_samples",
    "200",
]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """One tiny training run per shipped toy config (shared by the tests below)."""
    from flowdiff.cli import main

    runs = {}
    conditional = [
        "--model.net.init_args.num_classes",
        "8",
        "--data.init_args.p_uncond",
        "0.2",
        "--data.init_args.dataset",
        "8gaussians",
    ]
    for name, config, extra in (
        ("toy", "toy", []),
        ("toy_csm", "toy_csm", []),
        ("toy_cfg", "toy", conditional),
    ):
        root = tmp_path_factory.mktemp(name) / "run"
        main(
            [
                "fit",
                "--config",
                f"{config}.yaml",
                "--trainer.default_root_dir",
                str(root),
                *TINY,
                *extra,
            ]
        )
        runs[name] = root
    return runs


@pytest.mark.parametrize("name", ["toy", "toy_csm"])
def test_fit_writes_run_directory(toy_runs, name):
    root = toy_runs[name]
    assert (root / "config.yaml").is_file()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30
    # self-describing: the model's classes and the data's shape are in the checkpoint
    hp = ckpt["hyper_parameters"]
    assert hp["net"]["class_path"] == "flowdiff.nets.mlp.MLP"
    assert list(hp["data_shape"]) == [2]
    assert "current_model_state" in ckpt  # EMA weights in state_dict, raw ones kept for resuming
    # the cosine schedule has decayed the learning rate to 0 at max_steps
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)
    pictures = sorted((root / "samples").glob("val_step*.png"))
    assert [p.name for p in pictures] == ["val_step0000015.png", "val_step0000030.png"]


@pytest.mark.parametrize("name", ["toy", "toy_csm"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "euler-maruyama"])
def test_sample_from_checkpoint_alone(toy_runs, name, sampler, tmp_path, run_cli):
    ckpt = toy_runs[name] / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    args = ["sample", "--ckpt", ckpt, "--num-samples", 300, "--steps", 8, "--sampler", sampler,
            "--seed", 3]  # fmt: skip
    code, stdout, _ = run_cli(*args, "--out", out)
    assert code == 0
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["samples"].shape == (300, 2)
    assert torch.isfinite(saved["samples"]).all()
    assert saved["nfe"] == {"euler": 8, "heun": 15, "euler-maruyama": 8}[sampler]
    assert (out / "samples.png").stat().st_size > 10_000
    assert str(out / "samples.png") in stdout
    # same seed, same samples
    code, _, _ = run_cli(*args, "--out", tmp_path / "again")
    again = torch.load(tmp_path / "again" / "samples.pt", weights_only=True)["samples"]
    torch.testing.assert_close(again, saved["samples"])  # the SDE's noise is seeded too


def test_guided_sampling_of_a_conditional_model(toy_runs, tmp_path, run_cli):
    ckpt = toy_runs["toy_cfg"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        "sample",
        "--ckpt",
        ckpt,
        "--guidance",
        "0,1,3",
        "--labels",
        "2,5",
        "--per-class",
        40,
        "--steps",
        5,
        "--sampler",
        "euler",
        "--out",
        out,
    )
    assert code == 0, stdout
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["samples"].shape == (3, 80, 2)
    assert saved["labels"].tolist() == [2] * 40 + [5] * 40
    assert saved["guidance"] == [0.0, 1.0, 3.0]
    assert saved["nfe"] == 5  # CFG doubles the batch, not the NFE
    # the same initial noise for every scale: w = 1 differs from w = 0 and w = 3 only by guidance
    assert not torch.allclose(saved["samples"][0], saved["samples"][1])
    assert (out / "samples.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", ["toy", "toy_csm"])
def test_sample_with_dopri5_and_with_a_grid(toy_runs, name, tmp_path, run_cli):
    """The CLI's samples are those of FlowModule.sample with the same sampler and seed; dopri5's
    NFE is what its field counted (the score model's field is clamped to [t_min, t_max])."""
    from flowdiff.checkpoint import load_run
    from flowdiff.samplers import Dopri5Sampler, HeunSampler, ShiftGrid

    ckpt = toy_runs[name] / "checkpoints" / "last.ckpt"
    model = load_run(ckpt).model
    for args, sampler in (
        (["--sampler", "dopri5", "--atol", "1e-4", "--rtol", "1e-3"], Dopri5Sampler(1e-4, 1e-3)),
        (
            ["--sampler", "heun", "--steps", "6", "--grid", "shift:3"],
            HeunSampler(6, ShiftGrid(3.0)),
        ),
    ):
        out = tmp_path / sampler.label
        code, stdout, err = run_cli("sample", "--ckpt", ckpt, "--num-samples", 200, "--seed", 3,
                                    "--out", out, *args)  # fmt: skip
        assert code == 0, err
        saved = torch.load(out / "samples.pt", weights_only=True)
        expected = model.sample(200, sampler, generator=torch.Generator().manual_seed(3))
        assert saved["sampler"] == repr(sampler) and saved["nfe"] == expected.nfe
        torch.testing.assert_close(saved["samples"], expected.x, rtol=0, atol=0)
        assert f"NFE {expected.nfe}" in stdout
    assert saved["nfe"] == 11


def test_sample_with_a_guidance_interval(toy_runs, tmp_path, run_cli):
    from flowdiff.checkpoint import load_run
    from flowdiff.samplers import EulerSampler

    ckpt = toy_runs["toy_cfg"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    code, _, err = run_cli("sample", "--ckpt", ckpt, "--guidance", "3", "--labels", "2,5",
                           "--per-class", 40, "--steps", 5, "--sampler", "euler",
                           "--guidance-interval", "0.3,0.7",
                           "--out", out)  # fmt: skip
    assert code == 0, err
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["guidance_interval"] == [0.3, 0.7] and saved["nfe"] == 5
    y = torch.tensor([2] * 40 + [5] * 40)
    model, g = load_run(ckpt).model, torch.Generator().manual_seed(0)
    expected = model.sample(80, EulerSampler(5), y, 3.0, g, guidance_interval=(0.3, 0.7)).x
    torch.testing.assert_close(saved["samples"][0], expected, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(saved["samples"][0], model.sample(80, EulerSampler(5), y, 3.0, g).x)


@pytest.mark.parametrize(
    "run,args,message",
    [
        ("toy", ["--guidance", "3"], "trained without labels"),
        ("toy", ["--labels", "0"], "trained without labels"),
        ("toy_cfg", ["--guidance", "-1"], "guidance: expected a non-negative number"),
        ("toy_cfg", ["--guidance", "1,x"], "guidance: Not of type NonNegativeFloat"),
        ("toy_cfg", ["--labels", "0,8"], "outside the model's classes 0..7"),
    ],
)
def test_guidance_bad_input(toy_runs, tmp_path, run_cli, run, args, message):
    ckpt = toy_runs[run] / "checkpoints" / "last.ckpt"
    code, _, err = run_cli("sample", "--ckpt", ckpt, "--out", tmp_path / "out", *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_network_and_data_classes_must_agree(tmp_path, run_cli):
    code, _, err = run_cli(
        "fit",
        "--config",
        "toy.yaml",
        "--trainer.default_root_dir",
        tmp_path / "run",
        *TINY,
        "--model.net.init_args.num_classes",
        "3",
    )
    assert code == 2 and "the network has 3 classes but the data has 2" in err
    assert not (tmp_path / "run").exists()


def test_sample_refuses_to_overwrite(toy_runs, tmp_path, run_cli):
    ckpt = toy_runs["toy"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    assert (
        run_cli("sample", "--ckpt", ckpt, "--num-samples", 50, "--steps", 2, "--out", out)[0] == 0
    )
    before = (out / "samples.pt").read_bytes()
    code, _, err = run_cli(
        "sample", "--ckpt", ckpt, "--num-samples", 60, "--steps", 2, "--out", out
    )
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert (out / "samples.pt").read_bytes() == before
    code, _, _ = run_cli(
        "sample",
        "--ckpt",
        ckpt,
        "--num-samples",
        60,
        "--steps",
        2,
        "--out",
        out,
        "--overwrite",
        "true",
    )
    assert code == 0
    assert torch.load(out / "samples.pt", weights_only=True)["samples"].shape == (60, 2)


def test_fit_refuses_existing_run_and_resumes(toy_runs, run_cli):
    root = toy_runs["toy"]
    ckpt = root / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    code, _, err = run_cli("fit", "--config", "toy.yaml", "--trainer.default_root_dir", root, *TINY)
    assert code == 2 and "already holds a run" in err
    assert ckpt.read_bytes() == before
    # resume: the step count goes on from the checkpoint
    code, _, _ = run_cli(
        "fit",
        "--config",
        "toy.yaml",
        "--trainer.default_root_dir",
        root,
        *TINY,
        "--trainer.max_steps",
        "40",
        "--ckpt_path",
        "last",
    )
    assert code == 0
    assert torch.load(ckpt, weights_only=True)["global_step"] == 40


def test_a_moved_run_resumes_into_its_own_last_checkpoint(toy_runs, run_cli, tmp_path):
    """A run directory copied elsewhere and resumed there replaces its last.ckpt (Lightning would
    write last-v1.ckpt beside it, and the next --ckpt_path last would go back to the old step)."""
    root = tmp_path / "moved"
    shutil.copytree(toy_runs["toy_csm"], root)
    args = ["fit", "--config", "toy_csm.yaml", "--trainer.default_root_dir", root, *TINY,
            "--ckpt_path", "last"]  # fmt: skip
    assert run_cli(*args, "--trainer.max_steps", "40")[0] == 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    ckpt = root / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 40
    assert run_cli(*args, "--trainer.max_steps", "50")[0] == 0
    assert torch.load(ckpt, weights_only=True)["global_step"] == 50


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands(toy_runs, run_cli, subcommand):
    root = toy_runs["toy"]
    config_before = (root / "config.yaml").read_text()
    code, out, _ = run_cli(
        subcommand,
        "--config",
        "toy.yaml",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        root,
        "--validation.num_samples",
        "200",
        "--ckpt_path",
        root / "checkpoints" / "last.ckpt",
    )
    assert code == 0
    assert f"{'val' if subcommand == 'validate' else 'test'}/w2" in out
    assert (root / "config.yaml").read_text() == config_before


def test_fit_overwrite_replaces_the_run(tmp_path, run_cli):
    root = tmp_path / "run"
    assert run_cli("fit", "--config", "toy.yaml", "--trainer.default_root_dir", root, *TINY)[0] == 0
    code, _, err = run_cli(
        "fit",
        "--config",
        "toy.yaml",
        "--trainer.default_root_dir",
        root,
        *TINY,
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "20",
        "--overwrite",
        "true",
    )
    assert code == 0, err
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert [p.name for p in (root / "samples").glob("*.png")] == ["val_step0000020.png"]


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, foreign)
    return {
        "missing": tmp_path / "nope.ckpt",
        "truncated": truncated,
        "garbage": garbage,
        "foreign": foreign,
    }


@pytest.mark.parametrize(
    "ckpt_kind,args,message",
    [
        ("missing", [], "not found"),
        ("truncated", [], "cannot read checkpoint"),
        ("garbage", [], "cannot read checkpoint"),
        ("foreign", [], "not a self-describing flowdiff checkpoint"),
        ("good", ["--num-samples", "0"], "num_samples"),
        ("good", ["--num-samples", "-5"], "num_samples"),
        ("good", ["--steps", "0"], "steps"),
        ("good", ["--sampler", "rk5"], "unknown sampler 'rk5'"),
        ("good", ["--sigma", "-1"], "sigma"),
        (
            "good",
            ["--sampler", "euler-maruyama", "--sigma-schedule", "cubic"],
            "sigma_schedule: Expected",
        ),
    ],
)
def test_sample_bad_input(toy_runs, tmp_path, run_cli, ckpt_kind, args, message):
    good = toy_runs["toy"] / "checkpoints" / "last.ckpt"
    ckpt = good if ckpt_kind == "good" else _bad_checkpoints(tmp_path, good)[ckpt_kind]
    code, _, err = run_cli("sample", "--ckpt", ckpt, "--out", tmp_path / "out", *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.bogus", "1"], "bogus"),
        (["--trainer.max_steps", "many"], "max_steps"),
        (["--model.path.schedule", "quadratic"], "quadratic"),
        (["--data.init_args.dataset", "spiral9"], "unknown dataset 'spiral9'"),
        (["--model.sampler.init_args.steps", "0"], "steps must be a positive integer"),
        (["--data.init_args.batch_size", "0"], "batch_size must be a positive integer"),
        (["--model.sampler.class_path", "flowdiff.samplers.RK45"], "RK45"),
    ],
)
def test_fit_bad_config(tmp_path, run_cli, args, message):
    root = tmp_path / "run"
    code, _, err = run_cli(
        "fit",
        "--config",
        "toy.yaml",
        "--trainer.default_root_dir",
        root,
        "--trainer.logger",
        "false",
        *args,
    )
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not root.exists()


def test_bad_config_file(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  unknown_key: 3\n")
    code, _, err = run_cli("fit", "--config", bad, "--trainer.logger", "false")
    assert code == 2 and "unknown_key" in err
    code, _, err = run_cli("fit", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "not found" in err and "toy.yaml" in err


def test_shipped_config_by_bare_name_from_any_directory(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli("fit", "--config", "toy.yaml", "--print_config")
    assert code == 0 and "flowdiff.nets.mlp.MLP" in out


def test_help_lists_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "flowdiff.cli", "--help"], capture_output=True, text=True, check=True
    )
    for sub in ("fit", "validate", "test", "predict", "sample"):
        assert sub in result.stdout


def test_console_script_bad_input_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flowdiff.cli", "sample", "--ckpt", str(tmp_path / "none.ckpt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"flowdiff: error: checkpoint '{tmp_path / 'none.ckpt'}' not found"
    ]
