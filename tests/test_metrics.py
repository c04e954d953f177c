"""Point-cloud distances against exact answers."""

import pytest
import torch

from flowdiff.metrics import mmd, wasserstein2


@pytest.mark.parametrize("shift", [[0.0, 0.0], [1.5, -2.0], [0.1, 0.0]])
def test_w2_of_shifted_cloud_is_the_shift(shift):
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.tensor(shift, dtype=torch.float64)
    # for a cloud and its translate, the optimal plan is the identity: W2 = |v|
    assert wasserstein2(x, x + v) == pytest.approx(float(v.norm()), abs=1e-5)


def test_w2_of_two_points():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert wasserstein2(x, y) == pytest.approx(1.0)
    assert wasserstein2(x, x.flip(0)) == pytest.approx(0.0)


def test_mmd_zero_for_same_set_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    assert abs(mmd(x, y)) < 0.02
    shifted = [mmd(x, y + d) for d in (0.5, 1.0, 2.0)]
    assert shifted[0] > 0.02 and shifted == sorted(shifted)
