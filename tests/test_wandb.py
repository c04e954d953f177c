"""W&B: offline by itself without credentials, never a login prompt, a `wandb sync` hint."""

import os
import subprocess
import sys

from flowdiff.wandb_mode import choose_wandb_mode, has_wandb_credentials


def _clean_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_offline_without_credentials(monkeypatch, tmp_path):
    _clean_env(monkeypatch, tmp_path)
    assert not has_wandb_credentials()
    assert choose_wandb_mode() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


def test_online_with_api_key_or_netrc(monkeypatch, tmp_path):
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert choose_wandb_mode() == "online"
    assert "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert has_wandb_credentials()


def test_explicit_mode_is_kept(monkeypatch, tmp_path):
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode() == "disabled"


def test_fit_with_default_logger_runs_offline_without_a_prompt(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")
    root = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowdiff.cli",
            "fit",
            "--config",
            "toy.yaml",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_steps",
            "20",
            "--trainer.val_check_interval",
            "20",
            "--data.init_args.batches_per_epoch",
            "20",
            "--validation.num_samples",
            "100",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logging offline" in result.stdout  # news on stdout; stderr holds only problems
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert f"wandb sync {runs[0]}" in result.stdout
