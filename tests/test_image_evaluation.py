"""The evaluation of any image data: a classifier trained on the data's own training split,
Inception features from a weights file with the reference cached, bits/dim alone without
either, and `flowdiff evaluate` on an image folder."""

import json

import pytest
import torch
from test_images import fit_tiny, write_folder
from torch import nn

from flowdiff.data.evaluators import EvalOptions
from flowdiff.data.image_evaluation import labelled_source
from flowdiff.metrics import classifier as clf
from flowdiff.metrics import inception


def shapes(n: int, seed: int, size: int = 12):
    """Colour images of one of 3 classes: a red, green or blue square on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 80, (n, 3, size, size), generator=g, dtype=torch.uint8)
    for i, k in enumerate(y.tolist()):
        x[i, k, 3:9, 3:9] = 250
    return x, y


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setitem(clf.IMAGE_TRAINING, "min_steps", 60)
    monkeypatch.setitem(clf.IMAGE_TRAINING, "batch_size", 32)


def test_a_classifier_is_trained_on_the_data_and_cached(tmp_path, quick):
    train, test = shapes(300, 0), shapes(90, 1)
    recipe = clf.image_recipe((3, 12, 12), 3)
    model, info = clf.load_or_train_classifier(train, test, tmp_path, recipe=recipe)
    assert info.trained and info.path.name.startswith("image-classifier-")
    # Each class is its channel's bright square, told apart by one pixel value (250 against
    # noise below 80): a classifier that learned the data makes no mistake, and 0.95 lets 4 of
    # the 90 test images through (chance is 1/3).
    assert info.test_accuracy >= 0.95
    assert model.features(torch.zeros(2, 3, 12, 12)).shape == (2, clf.ImageClassifier.num_features)
    _, again = clf.load_or_train_classifier(train, test, tmp_path, recipe=recipe)
    assert not again.trained and again.path == info.path
    other = clf.image_recipe((3, 12, 12), 4)  # another architecture: another file
    assert clf.cache_path(tmp_path, clf.classifier_protocol(train, test, other), other.name) != (
        info.path
    )


def test_a_classifier_below_the_floor_the_user_sets_is_refused(tmp_path, quick):
    train, test = shapes(60, 0), shapes(30, 1)
    test = (test[0], (test[1] + 1) % 3)  # labels that disagree with the pictures
    recipe = clf.image_recipe((3, 12, 12), 3)
    with pytest.raises(clf.UsageError, match="below the 0.5.*--min-accuracy"):
        clf.load_or_train_classifier(train, test, tmp_path, min_accuracy=0.5, recipe=recipe)
    _, info = clf.load_or_train_classifier(train, test, tmp_path, min_accuracy=0.0, recipe=recipe)
    assert info.test_accuracy < 0.5


class MeanColour(nn.Module):
    """A stand-in for Inception: the mean of each channel, scaled to [0, 1]."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) / 255


def test_inception_features_come_from_a_torchscript_file_and_the_reference_is_cached(tmp_path):
    weights = tmp_path / "standin.pt"
    torch.jit.script(MeanColour()).save(str(weights))
    assert inception.is_torchscript(weights)
    extract = inception.load_inception(weights)
    images = torch.rand(20, 1, 4, 4) * 2 - 1
    expected = inception.to_rgb_uint8(images).double().mean(dim=(2, 3)) / 255
    torch.testing.assert_close(inception.inception_features(extract, images), expected)
    logs = []
    first = inception.reference_features(extract, images, weights, tmp_path, logs.append)
    assert "computing" in logs[-1] and len(list(tmp_path.glob("inception-reference-*.pt"))) == 1
    second = inception.reference_features(lambda x: 1 / 0, images, weights, tmp_path, logs.append)
    assert "loaded" in logs[-1] and torch.equal(first, second)


def test_unlabelled_images_without_inception_get_bits_per_dim_alone(tmp_path):
    source = labelled_source(lambda: (shapes(40, 0), shapes(20, 1)), (3, 12, 12), 0)
    from flowdiff.data.image_evaluation import NO_FEATURES, ImageEvaluator

    evaluator = ImageEvaluator(source, 0, EvalOptions(cache_dir=str(tmp_path)))
    assert evaluator.columns == []
    logs = []
    evaluator.prepare(10, logs.append)
    assert logs == [NO_FEATURES] and evaluator.floor == {}
    assert "bits/dim alone" in evaluator.protocol(10)["metrics"]


def test_evaluate_on_an_image_folder(tmp_path, run_cli, quick, monkeypatch):
    root = write_folder(tmp_path / "images", per_class=8, size=(14, 14))
    run = fit_tiny(root, tmp_path, run_cli)
    weights = tmp_path / "standin.pt"
    torch.jit.script(MeanColour()).save(str(weights))
    monkeypatch.setenv("FLOWDIFF_CACHE", str(tmp_path / "cache"))
    args = ["evaluate", "--ckpt", run / "checkpoints" / "last.ckpt", "--steps", "2",
            "--num-samples", "12", "--nll-samples", "4", "--nll-steps", "2", "--wandb", "false",
            "--inception-weights", weights, "--min-accuracy", "0"]  # fmt: skip
    code, out, err = run_cli(*args)
    assert code == 0, err
    metrics = json.loads((run / "eval" / "seed0" / "metrics.json").read_text())
    row = metrics["rows"][0]["metrics"]
    assert {"fid", "class_accuracy", "inception_fid", "inception_kid"} <= set(row)
    assert "held-out accuracy" in out and "Inception FID" in out
    assert metrics["likelihood"]["unit"] == "bits/dim"
    assert "computing the Inception features" in err
    code, _, err = run_cli(*args[:-4], "--out", tmp_path / "again", *args[-4:])
    assert code == 0 and "Inception reference features loaded" in err
    assert "classifier loaded" in err


def test_evaluate_on_a_flat_folder_reports_bits_per_dim_alone(tmp_path, run_cli, monkeypatch):
    root = write_folder(tmp_path / "flat", per_class=8, size=(14, 14), flat=True)
    run = fit_tiny(root, tmp_path, run_cli)
    monkeypatch.setenv("FLOWDIFF_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(
        "evaluate", "--ckpt", run / "checkpoints" / "last.ckpt", "--steps", "2",
        "--num-samples", "8", "--nll-samples", "4", "--nll-steps", "2", "--wandb", "false",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((run / "eval" / "seed0" / "metrics.json").read_text())
    assert metrics["rows"][0]["metrics"] == {} and metrics["floor"] == {}
    assert metrics["likelihood"]["unit"] == "bits/dim"
    assert "need labels" in out and not (run / "eval" / "seed0" / "quality_vs_nfe.png").exists()
