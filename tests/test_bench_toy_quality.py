"""bench/toy_quality.py's exact-field control is the field of the data it scores."""

import importlib.util
from pathlib import Path

import torch

from flowdiff.data.toy import eight_gaussians
from flowdiff.paths import GaussianConditionalPath

BENCH = Path(__file__).resolve().parents[1] / "bench" / "toy_quality.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("toy_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exact_field_is_the_mixture_the_data_draws_from():
    bench = load_bench()
    path = GaussianConditionalPath()
    field = bench.exact_field("8gaussians", path)
    x, y = eight_gaussians(80_000, torch.Generator().manual_seed(0))
    for k in range(8):
        points = x[y == k].double()
        mean, std = field.means[k].double(), float(field.stds[k])
        # the component's sample mean and std, within 5 standard errors
        assert (points.mean(0) - mean).abs().max() < 5 * std / len(points) ** 0.5
        assert abs(points.std(0).mean() - std) < 5 * std / (2 * len(points)) ** 0.5
    assert torch.allclose(field.weights, torch.full((8,), 1 / 8))
    assert bench.exact_field("moons", path) is None
    assert bench.exact_field("checkerboard", path) is None
