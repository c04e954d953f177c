"""The speed benchmarks run (tiny): bench/toy_throughput.py with --hidden, bench/lightning_floor.py,
bench/toy_overhead.py.
They time nothing here; they must only keep working, and measure what they say."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_toy_throughput_with_a_narrow_mlp_times_both_loops(tmp_path):
    report = tmp_path / "throughput.json"
    bench = "bench/toy_throughput.py"
    _run(bench, "--repeats", "1", "--steps", "140", "--hidden", "8", "--json", str(report))
    summary = json.loads(report.read_text())
    assert summary["hidden"] == 8 and summary["steps_per_run"] == 140
    ms = summary["ms_per_step"]
    for key in ("flowdiff", "bare_default", "bare_fused"):
        assert ms[key] > 0
    assert abs(ms["flowdiff"] * summary["median"]["flowdiff"] - 1e3) < 1e-6


def test_the_bare_loop_builds_the_width_it_is_given():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import toy_throughput
    finally:
        sys.path.pop(0)
    config = toy_throughput.with_hidden(toy_throughput.load_config("toy.yaml"), 8)
    assert config["model"]["net"]["init_args"]["hidden"] == 8
    assert toy_throughput.with_hidden(toy_throughput.load_config("toy.yaml"), None) == (
        toy_throughput.load_config("toy.yaml")
    )


def test_lightning_floor_reports_the_difference_of_its_two_loops():
    out = _run("bench/lightning_floor.py", "--steps", "140", "--repeats", "1")
    found = re.search(
        r"Lightning's loop ([0-9.]+) ms a step, the bare loop ([0-9.]+): the loop costs "
        r"(-?[0-9.]+) ms a step",
        out,
    )
    assert found, out
    lightning, bare, cost = map(float, found.groups())
    assert lightning > 0 and bare > 0
    assert abs((lightning - bare) - cost) <= 1.5e-3  # printed to 3 decimals


def test_toy_overhead_lists_each_part_and_their_sum():
    out = _run("bench/toy_overhead.py", "--steps", "20", "--calls", "5", "--val-every", "1500")
    rows = dict(re.findall(r"^\| (.+?) \| \**(-?[0-9.]+)\** \|", out, re.M))
    parts = {k: float(v) for k, v in rows.items() if "in all" not in k}
    for part in ("loss", "EMA", "non-finite guard", "logging", "checkpoint", "validation"):
        assert any(k.startswith(part) for k in parts), (part, out)
    total = float(next(v for k, v in rows.items() if "in all" in k))
    assert abs(total - sum(parts.values())) <= 0.05 * len(parts)  # printed to 1 decimal
    assert parts[next(k for k in parts if k.startswith("validation"))] > 0
