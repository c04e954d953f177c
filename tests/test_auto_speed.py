"""``precision: auto`` and ``compile: auto`` (flowdiff.speed): every branch of the rule, with the
hardware faked where PyTorch reports it (``torch.cpu.get_capabilities``, the table inductor reads
for AMX; ``torch.cuda.is_available`` / ``is_bf16_supported``); the choice printed once and
recorded in the run's config, the checkpoint and the outputs of sample, evaluate and reflow;
explicit values win. The compile cache's folder (flowdiff.utils.stable_compile_cache)."""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from flowdiff.inference import network_speed
from flowdiff.speed import FlowTrainer, choose, cpu_has_amx_bf16, device_kind
from flowdiff.utils import stable_compile_cache

TINY = [
    "--model.net.init_args.hidden", "16",
    "--model.net.init_args.depth", "2",
    "--data.init_args.batch_size", "32",
    "--trainer.logger", "false",
    "--trainer.limit_val_batches", "0",
    "--trainer.max_steps", "2",
]  # fmt: skip
AUTO = ["--trainer.precision", "auto", "--model.compile", "auto"]  # toy.yaml pins both

# (what the machine has) -> (the reason printed, precision, compile)
BRANCHES = {
    "cuda-bf16": ("a CUDA GPU with bf16", "bf16-mixed", False),
    "cuda-fp16": ("a CUDA GPU without bf16", "16-mixed", False),
    "cpu-amx": ("a CPU with AMX-BF16", "bf16-mixed", True),
    "cpu": ("a CPU without AMX-BF16", "32-true", False),
}


@pytest.fixture
def machine(monkeypatch):
    """``machine(name)`` makes PyTorch report the hardware of a BRANCHES key."""

    def fake(name: str) -> None:
        amx = name == "cpu-amx"
        capabilities = {**torch.cpu.get_capabilities(), "amx_bf16": amx, "amx_tile": amx}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: name.startswith("cuda"))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: name == "cuda-bf16")

    return fake


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    from flowdiff.cli import main

    root = tmp_path_factory.mktemp("toy") / "run"
    main(["fit", "--config", "toy.yaml", "--trainer.default_root_dir", str(root), *TINY])
    return root / "checkpoints" / "last.ckpt"


def test_amx_is_what_this_cpu_reports():
    """The check reads PyTorch's table, which agrees with the kernel's CPU flags."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    assert cpu_has_amx_bf16() == (" amx_bf16" in flags)


def test_faking_reaches_what_pytorch_itself_reads(machine):
    machine("cpu-amx")
    assert cpu_has_amx_bf16() and torch.cpu._is_amx_tile_supported()  # inductor's AMX check
    machine("cpu")
    assert not cpu_has_amx_bf16() and not torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("name", BRANCHES)
def test_each_branch_of_the_rule(machine, name):
    machine(name)
    reason, precision, compile = BRANCHES[name]
    kind = device_kind("auto")
    assert kind == name.split("-")[0]
    choice = choose("auto", "auto", kind)
    assert (choice.reason, choice.precision, choice.compile) == (reason, precision, compile)
    assert choice.line() == (
        f"flowdiff: precision {precision} (auto), compile {str(compile).lower()} (auto): {reason}"
    )
    device = torch.device(kind)  # sample / evaluate / reflow: the same rule on their device
    assert network_speed("auto", "auto", device) == choice
    if kind == "cpu":  # a trainer on a GPU cannot be built here
        assert FlowTrainer(precision="auto", logger=False).precision == precision


@pytest.mark.parametrize("name", BRANCHES)
def test_explicit_values_win(machine, name):
    machine(name)
    kind = device_kind("auto")
    assert choose("32-true", "auto", kind).precision == "32-true"
    assert choose("32-true", "auto", kind).compile is False  # compile paid with bf16 only
    assert choose("bf16-mixed", False, kind).compile is False
    assert choose("16-mixed", True, kind).compile is True
    assert choose(None, "auto", kind).precision == "32-true"  # Lightning's own default
    assert choose("32-true", True, kind).line() == "flowdiff: precision 32-true, compile true"


def test_no_compilation_without_a_compiler(machine, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    machine("cpu-amx")

    def missing():
        raise RuntimeError("no g++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    choice = choose("auto", "auto", "cpu")
    assert (choice.precision, choice.compile) == ("bf16-mixed", False)
    assert choice.reason == "a CPU with AMX-BF16 (no C++ compiler for torch.compile)"
    assert choose("auto", True, "cpu").compile is True  # given: the user's call


def test_other_accelerators_keep_full_precision(machine):
    machine("cuda-bf16")
    assert device_kind("cpu") == "cpu" and device_kind(torch.device("cpu")) == "cpu"
    assert device_kind("mps") == "other"
    assert choose("auto", "auto", "other").precision == "32-true"
    machine("cpu")
    assert device_kind("gpu") == "other"  # no GPU: Lightning says so when it builds the trainer


@pytest.mark.parametrize("name", ["cuda-bf16", "cpu-amx", "cpu"])
def test_fit_resolves_prints_once_and_records(machine, name, tmp_path, capsys):
    """The CLI resolves auto before building anything: the trainer, the module and the config
    that is saved into the run all hold the choice. (A trainer on a faked GPU runs on the CPU;
    16-mixed, CPU-less, is covered by the rule's test.)"""
    from flowdiff.cli import FlowdiffCLI

    machine(name)
    reason, precision, compile = BRANCHES[name]
    args = ["--config", "toy.yaml", "--trainer.default_root_dir", str(tmp_path), *TINY, *AUTO]
    cli = FlowdiffCLI(args=args, run=False)
    out = capsys.readouterr().out
    assert out.count("flowdiff: precision") == 1
    assert f"flowdiff: precision {precision} (auto), compile {str(compile).lower()} (auto): " \
           f"{reason}" in out  # fmt: skip
    assert cli.trainer.precision == precision
    assert cli.config.trainer.precision == precision and cli.config.model.compile is compile
    assert cli.model.compile_net is compile and cli.model.hparams["compile"] is compile


@pytest.mark.parametrize("name", ["cpu-amx", "cpu"])
def test_a_run_records_the_choice_in_its_config_and_checkpoint(machine, name, tmp_path, run_cli):
    machine(name)
    _, precision, _ = BRANCHES[name]
    root = tmp_path / "run"
    # compile given (false): explicit wins over auto, and the test compiles nothing
    args = ["--trainer.default_root_dir", root, *TINY, "--trainer.precision", "auto"]
    code, out, err = run_cli("fit", "--config", "toy.yaml", *args, "--model.compile", "false")
    assert code == 0, err
    assert out.count("flowdiff: precision") == 1
    assert f"flowdiff: precision {precision} (auto), compile false: " in out
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert config["trainer"]["precision"] == precision and config["model"]["compile"] is False
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["precision"] == precision and ckpt["compile"] is False
    assert ckpt["hyper_parameters"]["compile"] is False


@pytest.mark.parametrize("name", ["cpu-amx", "cpu"])
def test_a_module_built_in_python_resolves_auto_when_training_starts(machine, name, tmp_path):
    from flowdiff.data.toy import ToyDataModule
    from flowdiff.module import FlowModule
    from flowdiff.nets.mlp import MLP
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath

    machine(name)
    model = FlowModule(MLP(hidden=16, depth=2), GaussianConditionalPath(),
                       ConditionalFlowMatching())  # fmt: skip
    assert model.hparams["compile"] == "auto"
    compiled = []
    model.net.compile = lambda *a, **k: compiled.append(True)  # records the call, compiles nothing
    trainer = L.Trainer(max_steps=1, precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(model, ToyDataModule("moons", batch_size=32, batches_per_epoch=2))
    assert model.compile_net is (name == "cpu-amx") and bool(compiled) is (name == "cpu-amx")
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt["compile"] is (name == "cpu-amx") and ckpt["precision"] == "bf16-mixed"


@pytest.mark.parametrize("name", ["cpu-amx", "cpu"])
def test_sample_evaluate_and_reflow_choose_alike(machine, name, toy_ckpt, tmp_path, run_cli):
    machine(name)
    reason, precision, _ = BRANCHES[name]
    line = f"flowdiff: precision {precision} (auto), compile false: {reason}"
    code, out, err = run_cli("sample", "--ckpt", toy_ckpt, "--num-samples", 50, "--steps", 2,
                             "--compile", "false", "--out", tmp_path / "s")  # fmt: skip
    assert code == 0, err
    assert out.count("flowdiff: precision") == 1 and line in out
    saved = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert saved["precision"] == precision and saved["compile"] is False

    code, out, err = run_cli("evaluate", "--ckpt", toy_ckpt, "--out", tmp_path / "e",
                             "--num-samples", 60, "--steps", 2, "--nll", "false",
                             "--compile", "false")  # fmt: skip
    assert code == 0, err
    assert out.count("flowdiff: precision") == 1 and line in out
    protocol = json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]
    assert protocol["network precision"] == precision

    code, out, err = run_cli("reflow", "--ckpt", toy_ckpt, "--num-pairs", 20, "--steps", 2,
                             "--compile", "false", "--out", tmp_path / "pairs.pt")  # fmt: skip
    assert code == 0, err
    assert out.count("flowdiff: precision") == 1 and line in out
    teacher = torch.load(tmp_path / "pairs.pt", weights_only=True)["teacher"]
    assert teacher["precision"] == precision and teacher["compile"] is False


def test_sample_flags_given_win(machine, toy_ckpt, tmp_path, run_cli):
    machine("cpu-amx")
    code, out, err = run_cli("sample", "--ckpt", toy_ckpt, "--num-samples", 50, "--steps", 2,
                             "--precision", "32-true", "--out", tmp_path)  # fmt: skip
    assert code == 0, err
    assert "flowdiff: precision 32-true, compile false (auto): a CPU with AMX-BF16" in out
    saved = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert saved["precision"] == "32-true" and saved["compile"] is False


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TORCHINDUCTOR_CACHE_DIR": "{tmp}/mine"}, None),  # the user's choice stays
        ({"FLOWDIFF_CACHE": "{tmp}/fd"}, "{tmp}/fd/inductor"),
        ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/flowdiff/inductor"),
        ({"HOME": "{tmp}/home"}, "{tmp}/home/.cache/flowdiff/inductor"),
    ],
)
def test_the_compile_cache_lives_in_the_users_cache_directory(monkeypatch, tmp_path, env, expected):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "FLOWDIFF_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    before = dict(os.environ)
    got = stable_compile_cache()
    if expected is None:
        assert got is None and os.environ == before
    else:
        expected = expected.format(tmp=tmp_path)
        assert got == expected and os.environ["TORCHINDUCTOR_CACHE_DIR"] == expected
        assert Path(expected).is_dir()
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        assert cache_dir() == expected  # where inductor writes


def test_the_command_sets_the_cache_before_anything_compiles(monkeypatch, tmp_path, run_cli):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # what importing torch._dynamo (with Lightning) writes there: inductor's own /tmp default
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.delenv("FLOWDIFF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run_cli("sample", "--help")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "flowdiff" / "inductor")
