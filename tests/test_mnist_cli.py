"""CLI smoke runs of the MNIST configs with a tiny U-Net on fake data, then guided sampling."""

import pytest
import torch
from test_mnist_data import write_fake_mnist

from flowdiff.evaluate.sharding import chunk_generator

TINY_UNET = [
    "--model.net.init_args.channels", "[8, 16]",
    "--model.net.init_args.num_res_blocks", "1",
    "--model.net.init_args.norm_groups", "4",
    "--model.sampler.init_args.steps", "2",
    "--validation.num_samples", "10",
    "--data.init_args.batch_size", "8",
    "--data.init_args.val_size", "10",
    "--data.init_args.download", "false",
    "--trainer.logger", "false",
    "--trainer.limit_val_batches", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mnist")
    write_fake_mnist(data_dir)
    return data_dir


@pytest.mark.parametrize("config", ["mnist.yaml", "mnist_csm.yaml"])
def test_fast_dev_run(fake_mnist, run_cli, config, tmp_path):
    code, _, err = run_cli(
        "fit",
        "--config",
        config,
        "--trainer.fast_dev_run",
        "true",
        "--data.init_args.data_dir",
        fake_mnist,
        "--trainer.default_root_dir",
        tmp_path / "run",
        *TINY_UNET,
    )
    assert code == 0, err


@pytest.mark.parametrize("config", ["mnist.yaml", "mnist_csm.yaml"])
def test_fit_then_guided_sample(fake_mnist, run_cli, config, tmp_path):
    root = tmp_path / "run"
    code, _, err = run_cli(
        "fit",
        "--config",
        config,
        "--data.init_args.data_dir",
        fake_mnist,
        "--trainer.default_root_dir",
        root,
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        *TINY_UNET,
    )
    assert code == 0, err
    assert (root / "samples" / "val_step0000004.png").is_file()  # a grid per guidance scale
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert list(ckpt["hyper_parameters"]["data_shape"]) == [1, 28, 28]
    out = tmp_path / "out"
    code, _, err = run_cli(
        "sample",
        "--ckpt",
        root / "checkpoints" / "last.ckpt",
        "--guidance",
        "1,3",
        "--per-class",
        "2",
        "--steps",
        "2",
        "--out",
        out,
    )
    assert code == 0, err
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["samples"].shape == (2, 20, 1, 28, 28)
    assert saved["labels"].tolist() == [k for k in range(10) for _ in range(2)]
    assert torch.isfinite(saved["samples"]).all()
    assert (out / "samples.png").stat().st_size > 5_000
    code, _, err = run_cli(
        "sample",
        "--ckpt",
        root / "checkpoints" / "last.ckpt",
        "--labels",
        "3,10",
        "--out",
        tmp_path / "bad",
    )
    assert code == 2 and "outside the model's classes 0..9" in err


def test_mnist_reflow_config_trains_on_a_guided_teachers_pairs(fake_mnist, run_cli, tmp_path):
    """mnist.yaml teacher -> reflow pairs at w = 3 with labels -> mnist_reflow.yaml student from
    the teacher's weights -> one-step samples at w = 1 (the pairs carry the guidance)."""
    teacher = tmp_path / "teacher"
    code, _, err = run_cli("fit", "--config", "mnist.yaml", "--data.init_args.data_dir",
                           fake_mnist, "--trainer.default_root_dir", teacher,
                           "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                           *TINY_UNET)  # fmt: skip
    assert code == 0, err
    teacher_ckpt = teacher / "checkpoints" / "last.ckpt"
    pairs = tmp_path / "pairs.pt"
    code, _, err = run_cli("reflow", "--ckpt", teacher_ckpt, "--num-pairs", "30", "--guidance",
                           "3", "--sampler", "midpoint", "--steps", "2", "--batch-size", "10",
                           "--out", pairs)  # fmt: skip
    assert code == 0, err
    content = torch.load(pairs, weights_only=True)
    assert content["x"].shape == content["x_0"].shape == (30, 1, 28, 28)
    # Labels from the class frequencies the teacher recorded of its data, drawn by each chunk's
    # generator after its noise.
    frequencies = torch.load(teacher_ckpt, weights_only=True)["data"]["class_frequencies"]
    assert len(frequencies) == 10 and abs(sum(frequencies) - 1) < 1e-12
    assert content["teacher"]["class_frequencies"] == frequencies
    for c in range(3):
        g = chunk_generator(0, c)
        torch.randn(10, 1, 28, 28, generator=g)
        y = torch.multinomial(torch.tensor(frequencies, dtype=torch.float64), 10,
                              replacement=True, generator=g)  # fmt: skip
        assert torch.equal(content["y"][10 * c : 10 * (c + 1)], y)
    student = tmp_path / "student"
    code, _, err = run_cli("fit", "--config", "mnist_reflow.yaml", "--data.init_args.path", pairs,
                           "--init_from", teacher_ckpt, "--trainer.default_root_dir", student,
                           "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                           "--data.init_args.batch_size", "8", "--validation.num_samples", "10",
                           "--trainer.logger", "false", "--trainer.limit_val_batches", "1",
                           *TINY_UNET[:6])  # fmt: skip
    assert code == 0, err
    ckpt = torch.load(student / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["coupling"] == "stored"
    out = tmp_path / "out"
    code, _, err = run_cli("sample", "--ckpt", student / "checkpoints" / "last.ckpt",
                           "--per-class", "1", "--out", out)  # fmt: skip
    assert code == 0, err
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["nfe"] == 1 and saved["samples"].shape[-3:] == (1, 28, 28)
    assert torch.isfinite(saved["samples"]).all()


@pytest.mark.parametrize("given,expected", [(None, "32-true"), ("bf16-mixed", "bf16-mixed")])
def test_precision_of_the_trainer(tmp_path, given, expected, monkeypatch):
    """mnist.yaml's precision: auto on a CPU without AMX (every branch: test_auto_speed.py)."""
    from flowdiff.cli import FlowdiffCLI

    no_amx = {**torch.cpu.get_capabilities(), "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: no_amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [
        "--config",
        "mnist.yaml",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    if given:
        args += ["--trainer.precision", given]
    cli = FlowdiffCLI(args=args, run=False)
    assert cli.trainer.precision == expected
