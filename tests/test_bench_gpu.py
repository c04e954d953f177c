"""bench/gpu.py --tiny: the GPU benchmark's every part, tiny, on a CPU with synthetic data.

Six in-process `flowdiff fit` runs, bare loops, sampling and a classifier: 167 s on the busy 2-core
machine where it was written (the load average was ~7), so it is marked ``slow``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_gpu_tiny_runs_and_writes_its_tables(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["tiny"] and report["matmul_tflops"] > 0
    rows = {(r["net"], r["precision"]) for r in report["training"]}
    assert rows == {(n, p) for n in ("unet", "dit") for p in ("32-true", "bf16-mixed")}
    for row in report["training"]:
        assert row["finite"] and row["flowdiff_images_per_s"] > 0 and row["bare_images_per_s"] > 0
    assert report["toy"]["flowdiff_steps_per_s"] > 0 and report["toy"]["bare_steps_per_s"] > 0
    sampling = report["sampling"]
    assert sampling["images_per_s"] > 0 and 0 <= sampling["label_accuracy"] <= 1
    assert report["checks"]["finite losses"] is True
    table = (tmp_path / "gpu.md").read_text()
    assert "| unet | bf16-mixed | no |" in table and "TFLOP/s" in table
