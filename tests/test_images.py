"""Image folders on small generated data: layouts, decoding, the uint8 cache, splits, DDP shards,
bad input, and the network sized by the data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowdiff.data.batches import Batches
from flowdiff.data.image_files import decode, scan
from flowdiff.data.images import ImageFolderDataModule
from flowdiff.utils import UsageError

COLOURS = {"blue": (20, 40, 220), "red": (220, 30, 30), "white": (255, 255, 255)}


def write_folder(root: Path, per_class=6, size=(37, 23), grey=False, classes=COLOURS, flat=False):
    """Solid-colour images (odd sizes; PNG and JPEG alternate) in class folders or flat."""
    for name, colour in classes.items():
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", size, colour)
            image = image.convert("L") if grey else image
            suffix = "png" if i % 2 else "jpg"
            image.save(folder / f"{name}{i:03d}.{suffix}", quality=100)
    return root


def module(root, tmp_path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return ImageFolderDataModule(str(root), decode_workers=1, **kwargs)


def test_class_folders_give_labels_names_and_colour_batches(tmp_path):
    root = write_folder(tmp_path / "images")
    (root / "red" / "notes.txt").write_text("not an image")  # ignored
    (root / ".hidden").mkdir()  # ignored
    dm = module(root, tmp_path, val_fraction=0.2)
    assert dm.class_names == ["blue", "red", "white"] and dm.num_classes == 3
    assert dm.data_shape == (3, 16, 16) and dm.p_uncond == 0.1
    assert dm.network_sizes() == {"in_channels": 3, "image_size": 16}
    dm.setup("fit")
    train, held_out = dm.split()
    assert len(train) + len(held_out) == 18 and len(held_out) == 4  # ceil(0.2 * 18)
    assert not set(train.tolist()) & set(held_out.tolist())
    xs, ys = zip(*dm.train_dataloader(), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (14, 3, 16, 16) and x.dtype == torch.float32
    assert sorted(y.tolist()) == sorted(dm.tensors()[1][train].tolist())
    png = dm.tensors()[0][1::2]  # PNG images are lossless: exactly their colour
    expected = {0: (20, 40, 220), 1: (220, 30, 30), 2: (255, 255, 255)}
    for image, label in zip(png, dm.tensors()[1][1::2], strict=True):
        assert image.flatten(1).unique(dim=1).T.tolist() == [list(expected[int(label)])]


def test_a_flat_grey_folder_is_unlabelled(tmp_path):
    root = write_folder(tmp_path / "flat", grey=True, flat=True)
    dm = module(root, tmp_path, channels=1)
    assert dm.num_classes == 0 and dm.class_names is None and dm.p_uncond == 0.0
    assert dm.data_shape == (1, 16, 16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and (y == 0).all()


def test_grey_images_become_rgb_and_colour_becomes_grey(tmp_path):
    grey = write_folder(tmp_path / "g", grey=True)
    images = module(grey, tmp_path, channels=3).tensors()[0]
    assert images.shape[1] == 3 and (images[:, 0] == images[:, 1]).all()
    colour = write_folder(tmp_path / "c")
    assert module(colour, tmp_path, channels=1).tensors()[0].shape[1] == 1


def test_decode_resizes_the_short_side_and_crops_the_centre(tmp_path):
    # 20 x 16 with a distinct value in each column: no resize (short side 16), 2 columns cut each
    # side by the center crop.
    columns = np.tile(np.arange(20, dtype=np.uint8) * 10, (16, 1))
    Image.fromarray(columns).save(tmp_path / "a.png")
    out = decode(tmp_path / "a.png", 16, 1)
    assert out.shape == (1, 16, 16) and (out[0] == columns[:, 2:18]).all()
    # A large solid image is halved, then resized: still solid, at the asked size.
    Image.new("RGB", (301, 97), (10, 200, 30)).save(tmp_path / "b.png")
    out = decode(tmp_path / "b.png", 24, 3)
    assert out.shape == (3, 24, 24) and (out.reshape(3, -1).T == [10, 200, 30]).all()


def test_the_cache_is_built_once_reused_and_rebuilt_when_files_change(tmp_path, capfd):
    root = write_folder(tmp_path / "images", per_class=3)
    first = module(root, tmp_path)
    folder = first.cache_folder()
    first.setup()
    assert "decoding 9 images" in capfd.readouterr().out
    assert (folder / "images.npy").is_file() and (folder / "meta.json").is_file()
    images = first.tensors()[0].clone()

    again = module(root, tmp_path)
    assert again.cache_folder() == folder
    again.setup()
    assert "decoding" not in capfd.readouterr().out
    assert torch.equal(again.tensors()[0], images)

    Image.new("RGB", (37, 23), (0, 0, 0)).save(root / "red" / "red000.png")  # content changes
    changed = module(root, tmp_path)
    assert changed.cache_folder() != folder
    changed.setup()
    assert "decoding" in capfd.readouterr().out
    assert module(root, tmp_path, image_size=8).cache_folder() != changed.cache_folder()


def test_an_unreadable_file_is_named_or_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "images", per_class=3)
    (root / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UsageError, match=r"cannot read image .*broken\.png.*skip_unreadable"):
        module(root, tmp_path).setup()
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing half-built is kept
    dm = module(root, tmp_path, skip_unreadable=True)
    dm.setup()
    assert len(dm.cache().rows) == 9 and dm.cache().skipped == [str(root / "red" / "broken.png")]
    train, held_out = dm.split()
    assert len(train) + len(held_out) == 9


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda p: p / "missing", {}, "no such folder"),
        (lambda p: p.mkdir() or p, {}, "holds no images"),
        (lambda p: write_folder(p) and (p / "empty").mkdir() or p, {}, "'empty' holds no images"),
        (lambda p: write_folder(p) and Image.new("RGB", (4, 4)).save(p / "x.png") or p, {},
         "holds both images"),
        (lambda p: write_folder(p), {"channels": 2}, "channels must be 1"),
        (lambda p: write_folder(p), {"val_fraction": 0.0}, "val_fraction must be in"),
        (lambda p: write_folder(p), {"val_fraction": 1.0}, "val_fraction must be in"),
        (lambda p: write_folder(p), {"image_size": 0}, "image_size must be a positive"),
    ],
)  # fmt: skip
def test_bad_folders_and_arguments_are_one_line_errors(tmp_path, make, kwargs, message):
    root = make(tmp_path / "data")
    with pytest.raises(UsageError, match=message):
        _ = module(root, tmp_path, **kwargs).num_classes  # the CLI asks at once, to size the net


def test_ddp_ranks_draw_disjoint_shares_of_the_training_split(tmp_path):
    images = torch.arange(40, dtype=torch.uint8).reshape(40, 1, 1, 1).expand(40, 1, 2, 2)
    labels = torch.arange(40)
    rows = torch.arange(0, 40, 3)  # a split: 14 of the 40 rows
    seen = []
    for rank in range(2):
        batches = Batches(images, labels, 3, torch.Generator().manual_seed(1), rank, 2, rows)
        seen.append(torch.cat([y for _, y in batches]).tolist())
    assert len(seen[0]) == len(seen[1]) == 7
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(rows.tolist())


def test_random_flip_mirrors_about_half_of_the_images():
    images = torch.zeros(200, 1, 2, 2, dtype=torch.uint8)
    images[:, :, :, 0] = 255  # left column white
    batches = Batches(images, torch.zeros(200, dtype=torch.long), 200, torch.Generator(), flip=True)
    x, _ = next(iter(batches))
    flipped = (x[:, 0, 0, 1] == 1).sum().item()
    assert 60 < flipped < 140 and ((x[:, 0, 0, 0] == 1) ^ (x[:, 0, 0, 1] == 1)).all()
    plain = next(iter(Batches(images, torch.zeros(200, dtype=torch.long), 200, torch.Generator())))
    assert (plain[0][:, 0, 0, 0] == 1).all()


def test_scan_orders_classes_and_files_like_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_folder(tmp_path / "images", per_class=2)
    nested = root / "blue" / "more"
    nested.mkdir()
    Image.new("RGB", (5, 5)).save(nested / "deep.png")
    files = scan(root)
    reference = ImageFolder(str(root))
    assert files.class_names == reference.classes
    found = [(str(p), y) for p, y in zip(files.paths, files.labels, strict=True)]
    assert found == reference.samples


def test_a_checkpointed_model_samples_without_its_images(tmp_path, run_cli):
    root = write_folder(tmp_path / "images", per_class=4)
    run = fit_tiny(root, tmp_path, run_cli)
    import shutil

    shutil.rmtree(root)
    code, out, err = run_cli(
        "sample", "--ckpt", run / "checkpoints" / "last.ckpt", "--labels", "red,blue",
        "--per-class", "3", "--steps", "2", "--guidance", "1,2",
    )  # fmt: skip
    assert code == 0, err
    payload = torch.load(next((run / "samples").rglob("samples.pt")), weights_only=True)
    assert payload["labels"].tolist() == [1, 1, 1, 0, 0, 0]
    assert payload["samples"].shape == (2, 6, 3, 12, 12)
    code, _, err = run_cli("sample", "--ckpt", run / "checkpoints" / "last.ckpt", "--labels", "cat")
    assert code == 2 and "'cat' is not a class of this model (blue, red, white)" in err


def fit_tiny(root, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli(
        "fit", "--config", "images.yaml", "--data.init_args.root", root,
        "--data.init_args.image_size", "12", "--data.init_args.batch_size", "4",
        "--data.init_args.cache_dir", tmp_path / "cache", "--data.init_args.decode_workers", "1",
        "--model.net.init_args.channels", "[8, 16]", "--model.net.init_args.norm_groups", "4",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", run, "--trainer.logger", "false",
        "--validation.num_samples", "6", "--model.sampler.init_args.steps", "2",
    )  # fmt: skip
    assert code == 0, err
    return run


def test_fit_sizes_the_network_from_the_data(tmp_path, run_cli):
    root = write_folder(tmp_path / "images", per_class=4)
    run = fit_tiny(root, tmp_path, run_cli)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    net = ckpt["hyper_parameters"]["net"]["init_args"]
    assert net["in_channels"] == 3 and net["num_classes"] == 3
    assert ckpt["data"]["class_names"] == ["blue", "red", "white"]
    assert ckpt["data"]["data_shape"] == [3, 12, 12]
