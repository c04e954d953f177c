"""The Shapes data: drawn deterministically from its seed, every image shows what its caption says
(read back from the pixels), held-out combinations never reach training; its evaluation scores
real images near 1 and noise near chance; its config trains and evaluates end to end."""

import math

import pytest
import torch

from flowdiff.data.shapes import (
    ATTRIBUTES,
    COLOURS,
    COMBINATIONS,
    HELD_OUT,
    SEEN,
    SIZE_RANGE,
    SIZES,
    TEMPLATES,
    ShapesDataModule,
    caption,
    combination_index,
    draw_shapes,
    parse_caption,
    reference_combinations,
)


def test_the_same_seed_draws_the_same_data_and_another_seed_other_data():
    a, b = (
        ShapesDataModule(image_size=16, num_train=64),
        ShapesDataModule(image_size=16, num_train=64),
    )
    other = ShapesDataModule(image_size=16, num_train=64, seed=1)
    assert torch.equal(a.training_set()[0], b.training_set()[0])
    assert a.captions() == b.captions()
    assert not torch.equal(a.training_set()[0], other.training_set()[0])
    x, captions = a.reference(8, 3)
    x2, captions2 = b.reference(8, 3)
    assert torch.equal(x, x2) and captions == captions2


def test_every_wording_names_its_combination():
    for index, combination in enumerate(COMBINATIONS):
        for template in range(len(TEMPLATES)):
            assert parse_caption(caption(combination, template)) == index
    with pytest.raises(ValueError, match="does not name"):
        parse_caption("a red circle")


@pytest.mark.parametrize("size", [24, 32])
def test_each_image_shows_its_captions_colour_position_shape_and_size(size):
    images, combos, captions = ShapesDataModule(image_size=size).reference_pixels(192, 7)
    for image, combo, text in zip(images, combos.tolist(), captions, strict=True):
        shape, colour, position, extent = COMBINATIONS[combo]
        assert parse_caption(text) == combo
        inside = (image > 0).any(0)  # (S, S): the shape's pixels (the background is black)
        # Every shape pixel has exactly the caption's colour.
        assert (image[:, inside].T == torch.tensor(COLOURS[colour], dtype=torch.uint8)).all()
        rows, cols = inside.nonzero().T.float() + 0.5
        top, left = position.split()[0] == "top", position.split()[1] == "left"
        assert (rows.mean() < size / 2) == top and (cols.mean() < size / 2) == left
        # All of it inside its quadrant.
        assert ((rows < size / 2) == top).all() and ((cols < size / 2) == left).all()
        area = int(inside.sum())  # within the extent's range for its kind, +- a pixel of edge
        h_low, h_high = (bound * size for bound in SIZE_RANGE[extent])
        factor = {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape]
        assert factor * (h_low - 1) ** 2 <= area <= factor * (h_high + 1) ** 2, (shape, extent)
        # A square fills its bounding box; a triangle widens row by row from its apex; a
        # circle is widest inside, not at its top or bottom row, and fills ~pi/4 of its box.
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = area / float(box)
        widths = inside.sum(1)[inside.any(1)]
        if shape == "square":
            assert fill == 1.0
        elif shape == "triangle":
            assert (widths.diff() >= 0).all() and widths[0] < widths[-1] and fill < 0.7
        else:
            assert 0.68 <= fill <= 0.95 and widths[0] < widths.max() > widths[-1]


def test_at_24_px_a_circle_and_the_square_of_the_same_draw_differ_in_8_pixels_or_more():
    # The same generator state draws the same centre and extent whatever the shape: the two
    # shapes of each pair differ in their outline only. A generator needs pixels to tell them
    # apart by; at the old geometry (small h = 3 px, squares of half-side 0.85 h) as few as 2.
    n, differ, sizes = 2000, {}, {}
    for size in SIZES:
        circles, squares = (
            draw_shapes(
                torch.full((n,), combination_index((shape, "red", "top left", size))),
                24,
                torch.Generator().manual_seed(3),
            )[:, 0]
            > 0
            for shape in ("circle", "square")
        )
        differ[size] = int((circles ^ squares).flatten(1).sum(1).min())
        sizes[size] = circles.flatten(1).sum(1), squares.flatten(1).sum(1)
    assert min(differ.values()) >= 8, differ
    # And a large shape always has more pixels than a small one of its kind.
    for kind in range(2):
        assert sizes["large"][kind].min() > sizes["small"][kind].max()


def test_held_out_combinations_never_reach_training_and_alternate_in_the_reference():
    data = ShapesDataModule(image_size=16, num_train=2000)
    held = {COMBINATIONS.index(c) for c in HELD_OUT}
    assert len(HELD_OUT) == 8 and len(SEEN) == len(COMBINATIONS) - 8
    assert not held & set(data.training_set()[1].tolist())
    assert not held & {parse_caption(c) for c in data.captions()}
    val = next(iter(data.val_dataloader()))[1]
    assert not held & {parse_caption(c) for c in val}
    reference = reference_combinations(32).tolist()
    assert all((c in held) == (i % 2 == 1) for i, c in enumerate(reference))
    # Every pair of values of two attributes still occurs in training.
    seen = [COMBINATIONS[c] for c in set(data.training_set()[1].tolist())]
    for i in range(4):
        for j in range(i + 1, 4):
            pairs = {(c[i], c[j]) for c in seen}
            values = list(ATTRIBUTES.values())
            assert len(pairs) == len(values[i]) * len(values[j])


@pytest.fixture(scope="module")
def fast_training(tmp_path_factory):
    """The evaluation networks with short recipes (the shipped ones take minutes)."""
    import flowdiff.data.shapes_evaluation as shapes_evaluation
    import flowdiff.metrics.classifier as classifier
    import flowdiff.metrics.contrastive as contrastive

    mp = pytest.MonkeyPatch()
    mp.setattr(contrastive, "TRAINING", {**contrastive.TRAINING, "steps": 200})
    mp.setattr(classifier, "IMAGE_TRAINING", {**classifier.IMAGE_TRAINING, "min_steps": 250})
    mp.setattr(shapes_evaluation, "CLASSIFIER_TRAIN", 4000)
    yield tmp_path_factory.mktemp("cache")
    mp.undo()


@pytest.fixture(scope="module")
def evaluator(fast_training):
    from flowdiff.data.evaluators import EvalOptions

    data = ShapesDataModule(image_size=16, num_train=2000)
    evaluator = data.evaluator(EvalOptions(str(fast_training), min_accuracy=0.8))
    evaluator.prepare(128, lambda message: None)
    return evaluator, data


def test_real_held_out_images_score_near_one_and_noise_near_chance(evaluator):
    evaluator, data = evaluator
    floor = evaluator.floor  # other held-out images with their own captions
    assert floor["seen_all"] >= 0.9 and floor["held_out_all"] >= 0.9
    assert floor["r_precision"] >= 0.8
    real = evaluator.score(data.reference(128, 1_000_081)[0])  # the prompts' own images
    assert real["fd"] < 1e-6  # the reference against itself
    noise = evaluator.score(
        torch.rand(128, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    assert noise["seen_all"] <= 0.2 and noise["held_out_all"] <= 0.2
    assert noise["r_precision"] <= 0.25 and noise["fd"] > 10 * floor["fd"]


def test_r_precision_of_real_pairs_far_above_shuffled_pairs(evaluator):
    evaluator, data = evaluator
    images = data.reference(128, 1_000_081)[0]
    # Image i against prompt i - 1: the reference alternates seen and held-out combinations, so
    # each image meets a prompt of other content (prompt i - 2, the previous combination of the
    # image's own group, often differs in size alone: a near miss, not a shuffle).
    shuffled = torch.roll(torch.arange(128), 1)
    right = evaluator.score(images)["r_precision"]
    wrong = evaluator.score(images, shuffled)["r_precision"]
    assert right >= 0.8 and wrong <= 0.1


def test_r_precision_exact_on_hand_made_embeddings():
    from flowdiff.metrics.text import r_precision

    eye = torch.eye(4)
    groups = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    assert r_precision(eye, eye, torch.arange(4), groups, g) == 1.0
    assert r_precision(eye, eye, torch.tensor([1, 0, 3, 2]), groups, g) == 0.0
    # A caption of the same group is no distractor: the second wording of content 0 ties nothing.
    pool = torch.stack([eye[0], eye[0], eye[1]])
    assert r_precision(eye[:1], pool, torch.tensor([0]), torch.tensor([0, 0, 1]), g) == 1.0


def test_the_config_fits_and_evaluates_end_to_end(fast_training, tmp_path):
    import json

    from flowdiff.cli import main

    run = tmp_path / "run"
    main([
        "fit", "--config", "shapes_text.yaml", "--data.init_args.image_size", "16",
        "--data.init_args.num_train", "2000", "--data.init_args.batch_size", "16",
        "--model.net.init_args.hidden", "16", "--model.net.init_args.depth", "1",
        "--model.text_encoder.init_args.dim", "8", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
        "--validation.num_samples", "4", "--model.sampler.init_args.steps", "2",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
    ])  # fmt: skip
    out = tmp_path / "eval"
    main([
        "evaluate", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--num-samples", "32",
        "--steps", "2", "--guidance", "1,2", "--nll-samples", "8", "--nll-steps", "2",
        "--wandb", "false", "--out", str(out), "--classifier-cache", str(fast_training),
        "--min-accuracy", "0.8",
    ])  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    assert [row["guidance"] for row in report["rows"]] == [1.0, 2.0]
    for key in ("fd", "r_precision", "seen_all", "held_out_all", "held_out_shape"):
        assert all(0 <= row["metrics"][key] for row in report["rows"]), key
    assert report["floor"]["held_out_all"] >= 0.9
    assert "held-out images" in report["protocol"]["prompts"]
    assert report["likelihood"]["unit"] == "bits/dim"


def test_any_captioned_images_get_r_precision_from_their_own_training_split(
    fast_training, tmp_path
):
    """A tensor file of images and captions (no attributes known): R-precision and FD alone."""
    from flowdiff.data.evaluators import EvalOptions
    from flowdiff.data.pairs import TensorPairsDataModule

    images, combos, captions = ShapesDataModule(image_size=16).reference_pixels(1200, 11)
    torch.save({"x": images, "text": captions}, tmp_path / "pairs.pt")
    data = TensorPairsDataModule(str(tmp_path / "pairs.pt"), val_fraction=0.1)
    evaluator = data.evaluator(EvalOptions(str(fast_training)))
    evaluator.prepare(64, lambda message: None)
    assert [c.key for c in evaluator.columns] == ["fd", "r_precision"]
    held_out = data.reference(64, 1_000_081)[0]  # the prompts' own images
    assert evaluator.score(held_out)["r_precision"] >= 0.6
    assert evaluator.score(held_out, torch.roll(torch.arange(64), 1))["r_precision"] <= 0.2


def test_clip_score_refuses_a_missing_folder_and_says_when_transformers_is_absent(
    tmp_path, monkeypatch
):
    import importlib.util

    from flowdiff.metrics.text import check_clip
    from flowdiff.utils import UsageError

    with pytest.raises(UsageError, match="no such folder"):
        check_clip(str(tmp_path / "nowhere"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "transformers" else real(name)
    )
    assert "pip install 'flowdiff[text]'" in check_clip(str(tmp_path))
