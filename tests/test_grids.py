"""Time grids of the fixed-step samplers against their closed forms: EDM's rho-grid through
``t = 1 / (1 + sigma)``, SD3's shift in flowdiff's direction of time (t = 0 noise, t = 1 data)."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.config import describe
from flowdiff.fields import Field
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import (
    GRIDS,
    EDMGrid,
    EulerSampler,
    HeunSampler,
    PowerGrid,
    RK4Sampler,
    ShiftGrid,
    UniformGrid,
    parse_grid,
)
from flowdiff.testing import GaussianMixtureField
from flowdiff.utils import UsageError

DTYPE = torch.float64
ALL = [UniformGrid(), EDMGrid(), EDMGrid(rho=3.0), ShiftGrid(3.0), ShiftGrid(0.5), PowerGrid(2.0)]
IDS = ["uniform", "edm", "edm-rho3", "shift3", "shift0.5", "power2"]


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 50, 1000])
@pytest.mark.parametrize("grid", ALL, ids=IDS)
def test_end_points_exact_and_strictly_increasing(grid, steps):
    s = grid(steps)
    assert s.dtype == DTYPE and s.shape == (steps + 1,)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    assert (s[1:] > s[:-1]).all()


def test_edm_closed_form():
    """N = 4: s_i = 1 / (1 + sigma_i), sigma_i = (80^(1/7) + i/3 (0.002^(1/7) - 80^(1/7)))^7 for
    i = 1, 2, 3 (EDM's sigma_0 = 80 becomes the noise itself, s_0 = 0; sigma_4 = 0 is s_4 = 1)."""
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)
    sigmas = [(hi + i / 3 * (lo - hi)) ** 7 for i in (1, 2, 3)]
    expected = [0.0] + [1 / (1 + sigma) for sigma in sigmas] + [1.0]
    assert EDMGrid()(4).tolist() == pytest.approx(expected, rel=1e-14, abs=0)
    assert expected[3] == pytest.approx(1 / 1.002)  # the last step before t = 1 starts at sigma_min
    # The interior points' noise levels sigma = (1 - s) / s: evenly spaced in sigma^(1/rho).
    for rho in (7.0, 2.0):
        s = EDMGrid(rho=rho)(10)[1:-1]
        root = ((1 - s) / s) ** (1 / rho)
        steps = root[1:] - root[:-1]
        torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-10, atol=0)
    assert EDMGrid()(1).tolist() == [0.0, 1.0]


def test_shift_closed_form_in_flowdiffs_direction_of_time():
    """SD3 shifts its time tau (0 at data, 1 at noise) as tau' = shift tau / (1 + (shift - 1) tau);
    in flowdiff's t = 1 - tau that is s' = s / (s + shift (1 - s)): the noise level (1 - s) / s is
    multiplied by shift, and shift > 1 spends the steps near the noise (t = 0)."""
    shift = 3.0
    s = torch.linspace(0, 1, 9, dtype=DTYPE)
    grid = ShiftGrid(shift)(8)
    tau = 1 - s
    torch.testing.assert_close(grid, 1 - shift * tau / (1 + (shift - 1) * tau), rtol=0, atol=1e-15)
    assert grid[4].item() == pytest.approx(0.25)  # half the steps below t = 0.25
    assert grid[2].item() == pytest.approx(0.25 / (0.25 + 3 * 0.75))
    interior = slice(1, -1)
    sigma, shifted = (1 - s) / s, (1 - grid) / grid
    torch.testing.assert_close(shifted[interior], shift * sigma[interior], rtol=1e-13, atol=0)
    assert ShiftGrid(1.0)(8).tolist() == s.tolist()
    assert (ShiftGrid(0.5)(8)[interior] > s[interior]).all()  # shift < 1: towards the data


class Recording(Field):
    def __init__(self, inner):
        self.inner, self.path, self.times = inner, inner.path, []

    def velocity(self, x, t):
        self.times.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return self.inner.velocity(x, t)


def gaussian(name="cosine"):
    path = GaussianConditionalPath(name, t_min=0.0, t_max=1.0)
    mu = torch.tensor([[1.0, -2.0]], dtype=DTYPE)
    return GaussianMixtureField(path, [1.0], mu, [0.7]), mu[0], 0.7


@pytest.mark.parametrize("grid", ALL, ids=IDS)
def test_samplers_step_on_the_grid(grid):
    field = Recording(gaussian()[0])
    x_0 = torch.zeros(3, 2, dtype=DTYPE)
    EulerSampler(6, grid).sample(field, x_0, 0.1, 0.9)
    expected = (0.1 + 0.8 * grid(6))[:-1].tolist()
    assert field.times == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("grid", [EDMGrid(), ShiftGrid(3.0)], ids=["edm", "shift3"])
def test_heun_stays_second_order_on_a_graded_grid(grid):
    """A fixed grid of any shape is refined as a whole: Heun's error still falls ~4x a doubling."""
    field, mu, s = gaussian()
    x_0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    exact = mu + s * x_0
    errors = [(HeunSampler(n, grid).sample(field, x_0).x - exact).abs().max().item()
              for n in (40, 80, 160)]  # fmt: skip
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 1.6 < math.log2(coarse / fine) < 2.4, errors


def test_parse_grid_and_labels():
    assert sorted(GRIDS) == ["edm", "power", "shift", "uniform"]
    assert isinstance(parse_grid("uniform"), UniformGrid)
    assert parse_grid("edm").rho == 7.0 and parse_grid("edm:5").rho == 5.0
    assert parse_grid("shift").shift == 3.0 and parse_grid("shift:2.5").shift == 2.5
    assert parse_grid("power:3").power == 3.0
    for text in ("uniform", "edm:7", "edm:5", "shift:3", "shift:0.5", "power:2"):
        assert parse_grid(text).label == text
    assert HeunSampler(20, EDMGrid()).label == "heun-20steps-edm7"
    assert HeunSampler(20, ShiftGrid(2.5)).label == "heun-20steps-shift2.5"
    assert HeunSampler(20).label == HeunSampler(20, UniformGrid()).label == "heun-20steps"


def test_a_sampler_with_a_grid_is_written_down_and_rebuilt():
    """A model's sampler keeps its grid through the checkpoint's hyperparameters."""
    from lightning.pytorch.cli import instantiate_module

    from flowdiff.module import FlowModule
    from flowdiff.nets.mlp import MLP
    from flowdiff.objectives import ConditionalFlowMatching

    sampler = RK4Sampler(12, EDMGrid(rho=5.0))
    assert describe(sampler)["init_args"]["grid"] == {
        "class_path": "flowdiff.samplers.grids.EDMGrid",
        "init_args": {"rho": 5.0, "sigma_min": 0.002, "sigma_max": 80.0},
    }
    module = FlowModule(MLP(hidden=8), GaussianConditionalPath("linear"),
                        ConditionalFlowMatching(), sampler, data_shape=[2])  # fmt: skip
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    rebuilt = instantiate_module(FlowModule, checkpoint["hyper_parameters"]).sampler
    assert repr(rebuilt) == repr(sampler) and isinstance(rebuilt.grid, EDMGrid)
    times = rebuilt.times(0.0, 1.0, torch.zeros(1, dtype=DTYPE))
    assert times.tolist() == EDMGrid(5.0)(12).tolist()


@pytest.mark.parametrize(
    "text",
    ["linear", "edm:x", "edm:0", "edm:-1", "edm:nan", "shift:0", "shift:-2", "shift:inf",
     "uniform:3", "power:0.5", "EDM", ""],
)  # fmt: skip
def test_bad_grids_raise(text):
    with pytest.raises(UsageError):
        parse_grid(text)


def test_bad_grid_arguments_raise():
    bad = [
        lambda: EDMGrid(rho=0),
        lambda: EDMGrid(sigma_min=80, sigma_max=1),
        lambda: EDMGrid(sigma_min=0),
        lambda: ShiftGrid(-1),
        lambda: ShiftGrid("3"),
    ]
    for make in bad:
        with pytest.raises(UsageError):
            make()
