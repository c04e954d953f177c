"""CIFAR-10's data path on a fake CIFAR-10 in torchvision's on-disk format (never downloads)."""

import pickle

import numpy as np
import pytest
import torch

from flowdiff.data.cifar import CIFAR10DataModule
from flowdiff.utils import UsageError


def write_fake_cifar(data_dir, per_file=20):
    """``cifar-10-batches-py`` as torchvision reads it: pickled dicts of uint8 rows (N, 3072) in
    channel-major order and integer labels; pixel (0, 0, 0) of image i of file f is 10 f + i."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
    for f, name in enumerate([*names, "test_batch"]):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        data[:, 0] = 10 * f + np.arange(per_file) % 10
        batch = {"data": data, "labels": [int(k) for k in np.arange(per_file) % 10]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_fake_cifar_loads_in_torchvision_layout(tmp_path):
    write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=16, val_size=10, download=False)
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 10 and dm.class_names[3] == "cat"
    dm.setup()
    assert len(dm.splits["train"][1]) == 90 and len(dm.splits["val"][1]) == 10
    test_images, test_labels = dm.splits["test"]
    assert test_images.shape == (20, 3, 32, 32) and test_images.dtype == torch.uint8
    assert test_images[:, 0, 0, 0].tolist() == [50 + i % 10 for i in range(20)]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_missing_cifar_is_one_line_without_download(tmp_path):
    with pytest.raises(UsageError, match="CIFAR-10 not found"):
        CIFAR10DataModule(str(tmp_path), download=False).setup()


def test_cifar10_yaml_trains_on_the_fake_data(tmp_path, run_cli):
    write_fake_cifar(tmp_path / "data")
    run = tmp_path / "run"
    code, _, err = run_cli(
        "fit", "--config", "cifar10.yaml", "--data.init_args.data_dir", tmp_path / "data",
        "--data.init_args.download", "false", "--data.init_args.val_size", "10",
        "--data.init_args.batch_size", "4", "--model.net.init_args.channels", "[8, 16]",
        "--model.net.init_args.num_res_blocks", "1", "--model.net.init_args.norm_groups", "4",
        "--model.net.init_args.attention_levels", "[]", "--model.sampler.init_args.steps", "2",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", run, "--trainer.logger", "false",
        "--validation.num_samples", "10",
    )  # fmt: skip
    assert code == 0, err
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["init_args"]["in_channels"] == 3
    assert ckpt["data"]["class_names"][0] == "airplane"
