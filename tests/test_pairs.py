"""Tensor files of (x, y) pairs: the three file kinds, points and images, bad input, and a run
through fit and evaluate sized by the data."""

import json

import numpy as np
import pytest
import torch

from flowdiff.data.evaluators import PointEvaluator
from flowdiff.data.image_evaluation import ImageEvaluator
from flowdiff.data.pairs import TensorPairsDataModule
from flowdiff.utils import UsageError


def clusters(n=300, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.1 * torch.randn(n, dim, generator=g) + 2 * torch.nn.functional.one_hot(y, dim).float()
    return x, y


def test_a_pt_file_of_labelled_points(tmp_path):
    x, y = clusters()
    torch.save({"x": x, "y": y, "class_names": ["a", "b", "c"]}, tmp_path / "d.pt")
    dm = TensorPairsDataModule(str(tmp_path / "d.pt"), batch_size=64, val_fraction=0.1)
    assert dm.data_shape == (3,) and dm.num_classes == 3 and dm.class_names == ["a", "b", "c"]
    assert dm.network_sizes() == {"dim": 3}
    assert len(dm.val_rows) == 30 and len(dm.train_rows) == 270
    seen = torch.cat([b for b, _ in dm.train_dataloader()])
    expected = x[dm.train_rows]
    assert torch.equal(seen[seen[:, 0].argsort()], expected[expected[:, 0].argsort()])
    evaluator = dm.evaluator()
    assert isinstance(evaluator, PointEvaluator) and evaluator.num_samples == 30
    reference, labels = dm.reference(30, 1)
    held_out = {tuple(r) for r in x[dm.val_rows].tolist()}
    assert {tuple(r) for r in reference.tolist()} == held_out
    assert torch.equal(
        labels, y[dm.val_rows][torch.randperm(30, generator=torch.Generator().manual_seed(1))]
    )


def test_an_npz_of_uint8_images_and_an_npy_of_vectors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "i.npz", x=images, y=np.arange(40) % 4)
    dm = TensorPairsDataModule(str(tmp_path / "i.npz"), batch_size=8)
    assert dm.images and dm.data_shape == (1, 6, 6) and dm.num_classes == 4
    assert dm.network_sizes() == {"in_channels": 1, "image_size": 6}
    x, _ = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(x, torch.from_numpy(images[dm.val_rows[: len(x)]]) / 127.5 - 1)
    assert isinstance(dm.evaluator(), ImageEvaluator)

    np.save(tmp_path / "v.npy", np.random.default_rng(1).normal(size=(50, 2, 2)).astype("f4"))
    dm = TensorPairsDataModule(str(tmp_path / "v.npy"))
    assert not dm.images and dm.num_classes == 0 and dm.p_uncond == 0.0
    assert dm.data_shape == (2, 2) and dm.network_sizes() == {}


@pytest.mark.parametrize(
    "content, message",
    [
        ({"y": torch.zeros(4)}, "holds no 'x'"),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(4)}, "labels y must be integers"),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(3, dtype=torch.long)}, "one label per sample"),
        ({"x": torch.zeros(4, 2), "y": -torch.ones(4, dtype=torch.long)}, "must be >= 0"),
        ({"x": torch.zeros(4, 2, dtype=torch.long)}, "must be float"),
        ({"x": torch.zeros(4)}, "must be \\(N, ...\\)"),
    ],
)
def test_bad_tensor_files_are_one_line_errors(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=message):
        TensorPairsDataModule(str(tmp_path / "bad.pt"))


def test_missing_or_unknown_files(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        TensorPairsDataModule(str(tmp_path / "none.pt"))
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(UsageError, match="expected a .pt, .npz, .npy file"):
        TensorPairsDataModule(str(tmp_path / "d.csv"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="cannot read it"):
        TensorPairsDataModule(str(tmp_path / "junk.pt"))


def test_fit_and_evaluate_points_of_three_dimensions(tmp_path, run_cli):
    x, y = clusters(400)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    run = tmp_path / "run"
    code, _, err = run_cli(
        "fit", "--config", "toy.yaml",
        "--data.class_path", "flowdiff.data.pairs.TensorPairsDataModule",
        "--data.init_args.path", tmp_path / "d.pt", "--model.net.init_args.num_classes", "null",
        "--model.net.init_args.hidden", "32", "--trainer.max_steps", "5",
        "--trainer.default_root_dir", run, "--trainer.logger", "false",
        "--validation.num_samples", "20", "--model.sampler.init_args.steps", "2",
    )  # fmt: skip
    assert code == 0, err
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    net = ckpt["hyper_parameters"]["net"]["init_args"]
    assert net["dim"] == 3 and net["num_classes"] == 3
    code, out, err = run_cli(
        "evaluate", "--ckpt", run / "checkpoints" / "last.ckpt", "--steps", "2", "--guidance", "1",
        "--nll-steps", "2", "--wandb", "false",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((run / "eval" / "seed0" / "metrics.json").read_text())
    assert metrics["rows"][0]["metrics"]["w2"] > metrics["floor"]["w2"] > 0
    assert "40 held-out points" in out and "training points" in out
