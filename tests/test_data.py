"""Toy datasets (FFJORD's shapes and noise levels), the datamodule and label dropout."""

import math

import pytest
import torch

from flowdiff.data.labels import LabelDropout
from flowdiff.data.toy import DATASETS, NUM_CLASSES, GaussianMixture, ToyDataModule
from flowdiff.utils import UsageError

N = 20_000


def draw(name, n=N, seed=0):
    return DATASETS[name](n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shapes_labels_and_seeding(name):
    x, y = draw(name)
    assert x.shape == (N, 2) and x.dtype == torch.float32
    assert y.shape == (N,) and y.dtype == torch.long
    counts = torch.bincount(y, minlength=NUM_CLASSES[name])
    assert len(counts) == NUM_CLASSES[name]
    # every label is used, in roughly equal shares
    share = counts.double() / N
    assert (share - 1 / NUM_CLASSES[name]).abs().max() < 0.03
    x2, y2 = draw(name)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(draw(name, seed=1)[0], x)


def test_moons_radius_and_centres():
    # sklearn moons (radius 1, centres (0,0) and (1,0.5)), noise 0.1, scaled by 2, shifted (-1,-0.2)
    x, y = draw("moons")
    centres = torch.tensor([[-1.0, -0.2], [1.0, 0.8]])
    r = (x - centres[y]).norm(dim=1)
    assert abs(r.mean() - 2.0) < 0.02
    assert abs(r.std() - 0.2) < 0.02
    # the upper moon lies above its centre, the lower one below
    assert ((x[y == 0, 1] - centres[0, 1]) > -0.6).float().mean() > 0.99
    assert ((x[y == 1, 1] - centres[1, 1]) < 0.6).float().mean() > 0.99


def test_circles_radii():
    x, y = draw("circles")
    r = x.norm(dim=1)
    assert abs(r[y == 0].mean() - 3.0) < 0.02 and abs(r[y == 1].mean() - 1.5) < 0.02


def test_eight_gaussians_components():
    x, y = draw("8gaussians")
    for k in range(8):
        angle = k * math.pi / 4
        mean = torch.tensor([math.cos(angle), math.sin(angle)]) * 4 / 1.414
        pts = x[y == k]
        assert (pts.mean(0) - mean).norm() < 0.03
        assert (pts.std(0) - 0.5 / 1.414).abs().max() < 0.02


def test_checkerboard_fills_alternate_squares():
    x, y = draw("checkerboard")
    cells = torch.floor(x / 2).long()
    assert (x.abs() <= 4).all()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    # one label per filled square
    for k in range(8):
        assert len(torch.unique(cells[y == k], dim=0)) == 1


def test_spirals_arms_are_point_symmetric():
    x, y = draw("2spirals")
    assert (x[y == 0].mean(0) + x[y == 1].mean(0)).norm() < 0.1
    assert (x.norm(dim=1) < 3.6).all()


def test_gaussian_mixture_dataset():
    mix = GaussianMixture(means=[[-3.0, 0.0], [3.0, 1.0]], stds=[0.5, 1.0], weights=[1, 3])
    x, y = mix(N, torch.Generator().manual_seed(0))
    assert abs((y == 1).double().mean() - 0.75) < 0.01
    assert (x[y == 1].mean(0) - torch.tensor([3.0, 1.0])).norm() < 0.05
    assert (x[y == 1].std(0) - 1.0).abs().max() < 0.03
    with pytest.raises(ValueError):
        GaussianMixture(means=[[0.0, 0.0]], stds=[-1.0])


def test_datamodule_batches_and_reference():
    dm = ToyDataModule("8gaussians", batch_size=64, batches_per_epoch=5, val_size=300, seed=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for x, y in batches:
        assert x.shape == (64, 2) and y.shape == (64,)
    again = list(ToyDataModule("8gaussians", 64, 5, 300, seed=3).train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    ((xv, yv),) = list(dm.val_dataloader())
    assert xv.shape == (300, 2)
    assert torch.equal(xv, next(iter(dm.val_dataloader()))[0])  # fixed validation set
    assert not torch.equal(xv, next(iter(dm.test_dataloader()))[0])
    assert dm.data_shape == (2,) and dm.num_classes == 8
    assert torch.equal(dm.reference(100, seed=5)[0], dm.reference(100, seed=5)[0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"dataset": "swiss"}, "unknown dataset 'swiss'"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"p_uncond": 1.5}, "p_uncond"),
    ],
)
def test_datamodule_bad_arguments(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ToyDataModule(**kwargs)


def test_label_dropout_rate_and_null_label():
    y = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(0))
    dropped = LabelDropout(0.1, num_classes=10)(y, torch.Generator().manual_seed(1))
    null = dropped == 10
    # binomial: mean 0.1, std sqrt(0.09 / n) ~ 0.00095
    assert abs(null.double().mean() - 0.1) < 0.005
    assert torch.equal(dropped[~null], y[~null])
    assert torch.equal(LabelDropout(0.0, 10)(y), y)
    assert (LabelDropout(1.0, 10)(y) == 10).all()


class _Trainer:
    def __init__(self, training):
        self.training = training


def test_label_dropout_applies_to_training_batches_only():
    dm = ToyDataModule("8gaussians", batch_size=4000, p_uncond=0.5)
    x, y = dm.reference(4000, seed=0)
    dm.trainer = _Trainer(training=True)
    _, y_train = dm.on_after_batch_transfer((x, y), 0)
    assert 0.45 < (y_train == 8).double().mean() < 0.55
    dm.trainer = _Trainer(training=False)  # validation and test keep their labels
    _, y_val = dm.on_after_batch_transfer((x, y), 0)
    assert torch.equal(y_val, y)
