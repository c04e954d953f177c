"""Image metrics against exact answers, the classifier cache, and `flowdiff evaluate` on MNIST
(fake data: the real classifier is trained on the real 60k images, once, by the user)."""

import json
import math
import sys

import pytest
import torch
from test_mnist_cli import TINY_UNET
from test_mnist_data import write_fake_mnist
from torch import nn

from flowdiff.metrics import classifier as clf_module
from flowdiff.metrics.images import (
    ImageMetrics,
    class_accuracy,
    frechet_distance,
    kernel_distance,
    precision_recall,
    quantize,
)
from flowdiff.metrics.inception import check_inception
from flowdiff.utils import UsageError


def exact_gaussian_sample(n: int, mean: torch.Tensor, root: torch.Tensor, seed: int):
    """n points whose sample mean is ``mean`` and sample covariance (n - 1) is ``root @ root.T``,
    exactly (up to float64 rounding)."""
    d = len(mean)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / (n - 1))
    white = torch.linalg.solve_triangular(chol, x.T, upper=False).T  # sample covariance I
    return white @ root.T + mean


def random_rotation(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    """Sample 1: mean m1, covariance I. Sample 2: mean m2, covariance R diag(b) R^T. Then
    FID = |m1 - m2|^2 + tr(I + S2 - 2 S2^{1/2}) = |m1 - m2|^2 + sum (1 - sqrt b)^2."""
    d, n = 12, 400
    m1 = torch.linspace(-1, 1, d, dtype=torch.float64)
    m2 = m1 + 0.5 * torch.cos(torch.arange(d, dtype=torch.float64))
    b = torch.linspace(0.2, 4.0, d, dtype=torch.float64)
    rot = random_rotation(d, 1)
    x = exact_gaussian_sample(n, m1, torch.eye(d, dtype=torch.float64), seed=2)
    y = exact_gaussian_sample(n, m2, rot @ torch.diag(b.sqrt()), seed=3)
    expected = (m1 - m2).square().sum() + (1 - b.sqrt()).square().sum()
    assert frechet_distance(x, y) == pytest.approx(expected.item(), rel=1e-6)
    assert frechet_distance(y, x) == pytest.approx(expected.item(), rel=1e-6)


def test_kid_with_whole_set_subsets_is_the_unbiased_polynomial_mmd():
    """With subsets as large as the sets, every subset is the whole set: KID is the unbiased MMD^2
    with the kernel (x.y / d + 1)^3, and its spread over subsets is 0."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = 1.3 * torch.randn(300, 8, generator=g, dtype=torch.float64) + 0.2
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    n = len(x)
    kxx, kyy = k(x, x), k(y, y)
    expected = (
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        - 2 * k(x, y).mean()
    )
    mean, std = kernel_distance(x, y)
    assert mean == pytest.approx(expected.item(), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    assert kernel_distance(x, y) == (mean, std)  # seeded subsets


def test_kid_is_reproducible_with_smaller_subsets():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(1500, 4, generator=g), torch.randn(1200, 4, generator=g) + 0.3
    first = kernel_distance(x.double(), y.double())
    assert kernel_distance(x.double(), y.double()) == first
    assert first[0] > 0 and first[1] > 0


def test_precision_recall_on_a_line():
    """Real: 100 points at 0, 1, ..., 99. Fake: copies of 0..49, and 50 points far away.
    Precision: the 50 copies are inside the real manifold, the far ones are not: 0.5.
    Recall: the copies' k=3 radii are 2 inside the run of copies and 3 at its end (49: neighbours at
    1, 2, 3), so they cover the reals 0..52: 0.53."""
    real = torch.stack([torch.arange(100.0), torch.zeros(100)], 1)
    far = torch.stack([1e6 + torch.arange(50.0), torch.zeros(50)], 1)
    fake = torch.cat([real[:50], far])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.5
    assert recall == 0.53
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def level(v) -> torch.Tensor:
    """The float of 8-bit level ``v`` (the data's pixel map)."""
    return torch.as_tensor(v, dtype=torch.float32) / 127.5 - 1


class LabelFromPixel(nn.Module):
    """A stub classifier: predicts the 8-bit level (mod 10) of pixel (0, 0), read by truncation,
    so that noise below a level changes it; features are the pixels."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def features(self, x):
        return x.flatten(1).double()

    def forward(self, x):
        v = ((x[:, 0, 0, 0].double() + 1) * 127.5 + 1e-3).floor().long()
        return nn.functional.one_hot(v % 10, 10).float()


def test_class_accuracy_overall_and_per_class():
    labels = torch.arange(40) % 10
    predicted = labels.clone()
    predicted[[0, 10, 3]] = 9  # two misses in class 0, one in class 3
    images = torch.full((40, 1, 4, 4), -1.0)
    images[:, 0, 0, 0] = level(predicted)
    out = class_accuracy(LabelFromPixel(), images, labels)
    assert out["class_accuracy"] == pytest.approx(37 / 40)
    expected = [0.5, 1, 1, 0.75, 1, 1, 1, 1, 1, 1]
    assert out["class_accuracy_per_class"] == pytest.approx(expected)
    partial = class_accuracy(LabelFromPixel(), images[:5], labels[:5])
    assert partial["class_accuracy_per_class"][5:] == [None] * 5


def test_image_metrics_combine_the_parts():
    g = torch.Generator().manual_seed(6)
    real = torch.rand(200, 1, 4, 4, generator=g)
    real[:, 0, 0, 0] = level(torch.arange(200) % 10)
    fake = real.clone()[:120]
    fake[:, :, 1:] += 0.1 * torch.randn(120, 1, 3, 4, generator=g)
    metrics = ImageMetrics(LabelFromPixel(), real)
    out = metrics.compare(fake, torch.arange(120) % 10)
    r, f = quantize(real).flatten(1).double(), quantize(fake).flatten(1).double()
    assert out["fid"] == pytest.approx(frechet_distance(r, f), rel=1e-12)
    assert (out["kid_mean"], out["kid_std"]) == pytest.approx(kernel_distance(r, f))
    assert (out["precision"], out["recall"]) == precision_recall(r[:120], f)
    assert out["class_accuracy"] == 1.0
    assert "class_accuracy" not in metrics.compare(fake)


def test_quantize_maps_onto_the_data_pixel_levels():
    from flowdiff.data.mnist import pixels_to_float

    levels = pixels_to_float(torch.arange(256, dtype=torch.uint8))
    assert torch.equal(quantize(levels), levels)
    g = torch.Generator().manual_seed(7)
    noise = (2 * torch.rand(256, 100, generator=g) - 1) * 0.49 / 127.5  # below half a level
    assert torch.equal(quantize(levels[:, None] + noise), levels[:, None].expand(-1, 100))
    outside = torch.tensor([-7.0, -1.001, -1.0, 1.0, 1.001, 3.0])
    assert quantize(outside).tolist() == [-1, -1, -1, 1, 1, 1]


def on_levels(n: int, seed: int) -> torch.Tensor:
    """Images (n, 1, 4, 4) on 8-bit levels, a fifth of the pixels at -1 and a fifth at 1, and
    the label n mod 10 as the level of pixel (0, 0)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 256, (n, 1, 4, 4), generator=g)
    u = torch.rand(n, 1, 4, 4, generator=g)
    v[u < 0.2], v[u > 0.8] = 0, 255
    v[:, 0, 0, 0] = torch.arange(n) % 10
    return level(v)


def perturb(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise below half a level everywhere; pixels at -1 or 1 pushed out of [-1, 1] by up to 2."""
    g = torch.Generator().manual_seed(seed)
    out = images + (2 * torch.rand(images.shape, generator=g) - 1) * 0.49 / 127.5
    push = 2 * torch.rand(images.shape, generator=g)
    return torch.where(images.abs() == 1, images + images.sign() * push, out)


def test_image_metrics_see_images_on_8_bit_levels():
    """Sub-level noise and values outside [-1, 1] change nothing, in samples or reference."""
    real, fake, labels = on_levels(200, 8), on_levels(120, 9), torch.arange(120) % 10
    out = ImageMetrics(LabelFromPixel(), real).compare(fake, labels)
    noisy_real, noisy_fake = perturb(real, 10), perturb(fake, 11)
    assert ImageMetrics(LabelFromPixel(), noisy_real).compare(noisy_fake, labels) == out
    assert class_accuracy(LabelFromPixel(), noisy_fake, labels)["class_accuracy"] == 1.0
    # The perturbation is visible to anything that does not quantise:
    assert noisy_fake.min() < -1 and noisy_fake.max() > 1
    assert (noisy_fake[:, 0, 0, 0] < fake[:, 0, 0, 0]).any()  # a truncated label drops
    assert frechet_distance(real.flatten(1).double(), noisy_fake.flatten(1).double()) != out["fid"]


# --- the classifier and its cache -------------------------------------------------------------


def tiny_digits(n: int, seed: int):
    """Images whose class is a bright 7x7 square in one of 10 places: learnable in one epoch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        row, col = divmod(c, 4)
        images[i, 7 * row : 7 * row + 7, 7 * col : 7 * col + 7] = 255
    return images, labels


@pytest.fixture
def quick_training(monkeypatch):
    monkeypatch.setitem(clf_module.TRAINING, "epochs", 2)
    monkeypatch.setitem(clf_module.TRAINING, "batch_size", 32)
    return clf_module.TRAINING


def test_classifier_is_cached_reused_and_rebuilt_when_its_protocol_changes(
    tmp_path, quick_training, monkeypatch
):
    train, test = tiny_digits(320, 0), tiny_digits(100, 1)
    load = clf_module.load_or_train_classifier
    model, info = load(train, test, tmp_path, min_accuracy=0.9)
    assert info.trained and info.path.is_file() and info.test_accuracy >= 0.9
    assert info.path.name.startswith("mnist-classifier-") and info.path.suffix == ".pt"

    again, info2 = load(train, test, tmp_path, min_accuracy=0.9)
    assert not info2.trained and info2.path == info.path
    assert info2.test_accuracy == info.test_accuracy
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Other data: another name, trained again.
    other = (train[0].clone(), train[1].clone())
    other[0][0, 0, 0] ^= 1
    _, info3 = load(other, test, tmp_path, min_accuracy=0.9)
    assert info3.trained and info3.path != info.path

    # Another recipe: another name.
    monkeypatch.setitem(clf_module.TRAINING, "seed", 1)
    _, info4 = load(train, test, tmp_path, min_accuracy=0.9)
    assert info4.trained and info4.path not in (info.path, info3.path)
    monkeypatch.setitem(clf_module.TRAINING, "seed", 0)

    # A damaged cache file is trained again, and replaced by a good one.
    info.path.write_bytes(info.path.read_bytes()[:100])
    _, info5 = load(train, test, tmp_path, min_accuracy=0.9)
    assert info5.trained and info5.path == info.path
    _, info6 = load(train, test, tmp_path, min_accuracy=0.9)
    assert not info6.trained


def test_training_is_deterministic(tmp_path, quick_training):
    train = tiny_digits(160, 0)
    a, b = (
        clf_module.train_classifier(train, log=lambda _: None),
        clf_module.train_classifier(train, log=lambda _: None),
    )
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_classifier_below_the_accuracy_floor_is_refused_and_not_cached(tmp_path, quick_training):
    train, test = tiny_digits(40, 0), tiny_digits(40, 1)
    test = (test[0], (test[1] + 1) % 10)  # labels that disagree with the pictures
    with pytest.raises(UsageError, match="below the 0.99"):
        clf_module.load_or_train_classifier(train, test, tmp_path, min_accuracy=0.99)
    assert list(tmp_path.iterdir()) == []


def test_classifier_center_crops_32_pixel_inputs():
    torch.manual_seed(0)
    model = clf_module.MNISTClassifier().eval()
    x = torch.randn(3, 1, 28, 28)
    padded = nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    torch.testing.assert_close(model(padded), model(x))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(3, 1, 20, 20))


def test_inception_fid_needs_a_weights_file_and_torch_fidelity(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="no such file"):
        check_inception(tmp_path / "missing.pth")
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(UsageError, match="torch-fidelity"):
        check_inception(weights)


# --- flowdiff evaluate on (fake) MNIST ----------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A tiny conditional MNIST model trained for 4 steps on the fake dataset."""
    from flowdiff.cli import main

    data_dir = tmp_path_factory.mktemp("mnist")
    write_fake_mnist(data_dir)
    root = tmp_path_factory.mktemp("run")
    args = ["fit", "--config", "mnist.yaml", "--data.init_args.data_dir", str(data_dir)]
    args += ["--trainer.default_root_dir", str(root), "--trainer.max_steps", "4", *TINY_UNET]
    main(args)
    return data_dir, root / "checkpoints" / "last.ckpt"


def test_evaluate_on_mnist_reports_image_metrics_with_their_floor(
    mnist_run, run_cli, tmp_path, monkeypatch, quick_training
):
    monkeypatch.setattr(clf_module, "MIN_ACCURACY", 0.0)  # fake data: random pixels
    data_dir, ckpt = mnist_run
    cache, out = tmp_path / "cache", tmp_path / "eval"
    args = ["evaluate", "--ckpt", ckpt, "--num-samples", 20, "--steps", "2", "--guidance", "0,2"]
    args += ["--nll", "true", "--nll-samples", 6, "--nll-steps", 2, "--batch-size", 10]
    args += ["--data-dir", data_dir, "--classifier-cache", cache, "--out", out]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    rows = report["rows"]
    assert [(r["name"], r["steps"], r["guidance"]) for r in rows] == [
        ("euler", 2, 0.0),
        ("euler", 2, 2.0),
    ]
    for row in rows:
        metrics = row["metrics"]
        for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "class_accuracy"):
            assert math.isfinite(metrics[key]), key
        assert len(metrics["class_accuracy_per_class"]) == 10
        assert row["nfe"] == 2  # evaluations of the (guided) field: one a step
    assert (out / "quality_vs_nfe.png").is_file() and (out / "quality_vs_guidance.png").is_file()
    assert "FID" in stdout and "accuracy" in stdout

    # The floor is the protocol's: the seeded test images against the seeded training images, in
    # the features of the cached classifier.
    from flowdiff.data.mnist_files import load_split

    raw = data_dir / "MNIST" / "raw"
    train, test = load_split(raw, True), load_split(raw, False)
    model, info = clf_module.load_or_train_classifier(train, test, cache, min_accuracy=0.0)
    assert not info.trained  # evaluate cached it
    ref = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(1_000_081))
    pick = torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(2_000_081))[:20]
    expected = ImageMetrics(model, clf_module.to_float(train[0][ref])).compare(
        clf_module.to_float(test[0][pick]), test[1][pick]
    )
    floor = report["floor"]
    for key in ("fid", "kid_mean", "precision", "recall", "class_accuracy"):
        assert floor[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    # Bits/dim by the protocol: the seeded test images, dequantised with seeded noise, through the
    # ODE of the unconditional (null-label) field on the graded grid, seeded probes (one chunk).
    from flowdiff.checkpoint import load_run
    from flowdiff.evaluate.sharding import chunk_generator
    from flowdiff.likelihood import log_likelihood
    from flowdiff.metrics.pixels import bits_per_dim, dequantize
    from flowdiff.samplers import PowerGrid, RK4Sampler

    model = load_run(ckpt).model.eval()
    pick = torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(3_000_081))[:6]
    x = dequantize(test[0][pick].unsqueeze(1), torch.Generator().manual_seed(3_000_082))
    null = torch.full((6,), model.net.num_classes)
    log_p = log_likelihood(
        model.field(null),
        x.contiguous(memory_format=torch.channels_last),
        solver=RK4Sampler(2, PowerGrid(2.0)),
        divergence="hutchinson",
        generator=chunk_generator(3_000_081, 0),
    ).log_prob
    assert report["likelihood"]["unit"] == "bits/dim"
    expected_bpd = bits_per_dim(log_p.double(), 784).mean().item()
    assert report["likelihood"]["bits_per_dim"] == pytest.approx(expected_bpd, rel=1e-5)
    assert info.path.name in json.dumps(report["protocol"])
