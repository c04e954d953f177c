"""Speed settings: the network's precision and torch.compile in sampling and training, and the
device ``flowdiff sample`` picks by itself. Compiled runs take ~30 s each on 2 CPU cores (slow).
"""

import pytest
import torch

from flowdiff.inference import InferenceNetwork, network_speed, resolve_device
from flowdiff.nets.mlp import MLP
from flowdiff.utils import UsageError

TINY = [
    "--model.net.init_args.hidden", "16",
    "--model.net.init_args.depth", "2",
    "--data.init_args.batch_size", "32",
    "--trainer.logger", "false",
    "--trainer.limit_val_batches", "0",
    "--trainer.max_steps", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    from flowdiff.cli import main

    root = tmp_path_factory.mktemp("toy") / "run"
    main(["fit", "--config", "toy.yaml", "--trainer.default_root_dir", str(root), *TINY])
    return root / "checkpoints" / "last.ckpt"


def test_network_runs_in_autocast_and_returns_the_input_dtype():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2)
    x, t = torch.randn(64, 2), torch.rand(64)
    exact = net(x, t)
    half = InferenceNetwork(net, "bf16-mixed")(x, t)
    assert half.dtype == torch.float32  # the sampler's state stays float32
    assert not torch.equal(half, exact)  # the matmuls ran in bf16 ...
    torch.testing.assert_close(half, exact, atol=0.05, rtol=0.05)  # ... to bf16's precision
    assert torch.equal(InferenceNetwork(net, "32-true")(x, t), exact)


def test_default_device_and_precision(monkeypatch):
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="'cuda:99' is not available"):
        resolve_device("cuda:99")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    no_amx = {**torch.cpu.get_capabilities(), "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: no_amx)  # as on AMD EPYC
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert network_speed("auto", "auto", cpu).precision == "32-true"  # no AMX: no faster
    assert network_speed("auto", "auto", gpu).precision == "bf16-mixed"
    assert network_speed("bf16-mixed", "auto", cpu).precision == "bf16-mixed"  # given: kept
    assert not network_speed("auto", "auto", gpu).compile  # no bench/ figure on a GPU yet


def test_sample_at_bf16_and_the_recorded_defaults(toy_ckpt, tmp_path, run_cli):
    ckpt = torch.load(toy_ckpt, weights_only=True)
    assert ckpt["precision"] == "32-true"  # what flowdiff sample starts from on a GPU
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / precision
        code, stdout, err = run_cli("sample", "--ckpt", toy_ckpt, "--num-samples", 200, "--steps",
                                    10, "--out", out, "--precision", precision)  # fmt: skip
        assert code == 0, err
        assert f"cpu, {precision})" in stdout
        results[precision] = torch.load(out / "samples.pt", weights_only=True)
    assert results["32-true"]["precision"] == "32-true"
    assert results["bf16-mixed"]["device"] == "cpu"
    exact, half = results["32-true"]["samples"], results["bf16-mixed"]["samples"]
    assert half.dtype == torch.float32 and not torch.equal(half, exact)
    torch.testing.assert_close(half, exact, atol=0.1, rtol=0.1)


@pytest.mark.slow
def test_compiled_training_and_sampling(tmp_path, run_cli):
    """--model.compile: the same training, printed compile time, checkpoints whose names load
    without compile; sample --compile: the same samples as the eager network."""
    root = tmp_path / "run"
    code, out, err = run_cli("fit", "--config", "toy.yaml", "--trainer.default_root_dir", root,
                             *TINY, "--model.compile", "true")  # fmt: skip
    assert code == 0, err
    assert "flowdiff: network compiled in" in out
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    names = [*ckpt["state_dict"], *ckpt["current_model_state"]]
    assert names and not any("_orig_mod" in n for n in names)
    samples = {}
    for compiled in ("false", "true"):
        code, stdout, err = run_cli("sample", "--ckpt", root / "checkpoints" / "last.ckpt",
                                    "--num-samples", 100, "--steps", 5, "--compile", compiled,
                                    "--out", tmp_path / compiled)  # fmt: skip
        assert code == 0, err
        assert ("network compiled in" in stdout) == (compiled == "true")
        samples[compiled] = torch.load(tmp_path / compiled / "samples.pt", weights_only=True)
    torch.testing.assert_close(samples["true"]["samples"], samples["false"]["samples"])
