"""utils.atomic_path: the one way flowdiff writes a file (checkpoints, samples, metrics)."""

import os

import pytest

from flowdiff.utils import atomic_path


def test_atomic_path_replaces_the_file_whole(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"good checkpoint")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a")
            raise OSError("disk full")
    assert target.read_bytes() == b"good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_file_gets_the_permissions_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "samples.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert (tmp_path / "samples.png").stat().st_mode & 0o777 == 0o666 & ~umask


def _nvml(monkeypatch, loads: bool, setting: str | None = "1"):
    import ctypes

    import flowdiff.utils

    def cdll(name, *args, **kwargs):
        if name == "libnvidia-ml.so.1" and not loads:
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(flowdiff.utils.torch.backends.cuda, "is_built", lambda: True)
    if setting is None:
        monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", setting)


def test_the_nvml_probe_is_dropped_only_where_nvml_cannot_load(monkeypatch):
    from flowdiff.utils import skip_nvml_probe_without_driver

    _nvml(monkeypatch, loads=False)
    assert skip_nvml_probe_without_driver()
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
    _nvml(monkeypatch, loads=True)  # a driver: the probe keeps CUDA uninitialized, it stays
    assert not skip_nvml_probe_without_driver()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    _nvml(monkeypatch, loads=False, setting=None)  # nothing set: nothing to drop
    assert not skip_nvml_probe_without_driver()
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ


def test_dropping_the_nvml_probe_keeps_torch_cuda_answer(monkeypatch):
    import torch

    from flowdiff.utils import skip_nvml_probe_without_driver

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    before = torch.cuda.is_available()
    skip_nvml_probe_without_driver()
    assert torch.cuda.is_available() == before


def test_the_cli_drops_the_nvml_probe_on_a_machine_without_driver(monkeypatch, capsys):
    import ctypes

    from flowdiff import cli

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        pytest.skip("this machine has NVML: the setting stays")
    except OSError:
        pass
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
