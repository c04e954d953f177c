"""Captioned image folders (metadata.jsonl or a .txt beside each image): captions read, several
per image drawn per read, held-out captions for evaluate, bad input as one line before any work,
and images_text.yaml end to end: fit, sample --prompt, evaluate (with the DiT and the U-Net)."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_image_evaluation import MeanColour

from flowdiff.data.images import ImageFolderDataModule
from flowdiff.utils import UsageError

COLOURS = {"red": (220, 30, 30), "blue": (20, 40, 220), "green": (30, 200, 40)}
SIDES = ("left", "right")


def write_images(root: Path, per_colour: int = 4, folders: bool = False) -> list[str]:
    """PNG images of a colour on one half (left or right); their paths relative to ``root``."""
    names = []
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            side = SIDES[i % 2]
            image = Image.new("RGB", (12, 12), (0, 0, 0))
            image.paste(rgb, (0 if side == "left" else 6, 0, 6 if side == "left" else 12, 12))
            name = f"{colour}/{colour}{i}.png" if folders else f"{colour}{i}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / name)
            names.append(name)
    return names


def caption(name: str) -> str:
    colour = next(c for c in COLOURS if c in name)
    return f"a {colour} block on the {SIDES[int(name[-5]) % 2]}"


def write_metadata(root: Path, per_colour: int = 4, lines: list[str] | None = None) -> Path:
    names = write_images(root, per_colour)
    rows = [json.dumps({"file_name": n, "text": caption(n), "source": "test"}) for n in names]
    (root / "metadata.jsonl").write_text("\n".join(rows if lines is None else lines) + "\n")
    return root


def module(root, tmp_path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 8, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return ImageFolderDataModule(str(root), decode_workers=1, **kwargs)


def test_metadata_jsonl_gives_captions_several_per_image_one_drawn_per_read(tmp_path):
    root = tmp_path / "images"
    names = write_images(root, per_colour=2)
    lines = [json.dumps({"file_name": n, "text": caption(n)}) for n in names]
    lines[0] = json.dumps({"file_name": names[0], "text": ["first", "second"]})  # a list
    lines.append("")  # blank lines are allowed
    lines.append(json.dumps({"file_name": "./" + names[0], "text": "third"}))  # another line
    (root / "metadata.jsonl").write_text("\n".join(lines))
    dm = module(root, tmp_path, val_fraction=0.3)
    assert dm.captioned and dm.conditioning == "text" and dm.num_classes == 0
    assert dm.p_uncond == 0.1 and dm.describe()["conditioning"] == "text"
    train, held_out = dm.split()
    assert len(train) == 4 and len(held_out) == 2  # ceil(0.3 * 6)
    files = [p.name for p in dm.files.paths]  # sorted: blue0, blue1, green0, ...
    table = {i: ["first", "second", "third"] if n == names[0] else [caption(n)]
             for i, n in enumerate(files)}  # fmt: skip
    assert dm.captions() == [c for row in train.tolist() for c in table[row]]
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 8, 8) and y == [table[r][0] for r in held_out.tolist()]
    # red0 read 600 times: each of its three captions about a third of the time.
    red0 = torch.full((600,), files.index(names[0]))
    reads = Counter(dm.caption_table.index_select(0, red0))
    assert set(reads) == {"first", "second", "third"} and min(reads.values()) > 150
    # evaluate's prompts and the reference: held-out captions, the same for the same seed.
    row_of = {c: row for row, options in table.items() for c in options}
    asked = [row_of[c] for c in dm.held_out_captions(5)]  # each image once, then again
    assert set(asked) == set(held_out.tolist()) and sorted(Counter(asked).values()) == [2, 3]
    assert dm.held_out_captions(5) == dm.held_out_captions(5)
    assert dm.reference(2, 7)[1] == dm.reference(2, 7)[1]
    assert {row_of[c] for c in dm.reference(2, 7)[1]} == set(held_out.tolist())


def test_a_txt_beside_each_image_gives_captions_and_class_folders_give_no_labels(tmp_path):
    root = tmp_path / "images"
    names = write_images(root, per_colour=2, folders=True)
    for name in names:
        (root / name).with_suffix(".txt").write_text(f"{caption(name)}\n\nshort {name[:3]}\n")
    dm = module(root, tmp_path, val_fraction=0.2)
    assert dm.captioned and dm.num_classes == 0 and dm.class_names is None
    train = dm.split()[0].tolist()
    own = [dm.files.paths[row].relative_to(root).as_posix() for row in train]
    assert dm.captions() == [c for n in own for c in (caption(n), f"short {n[:3]}")]
    # captions none: the class folders are labels again.
    plain = module(root, tmp_path, captions="none")
    assert not plain.captioned and plain.num_classes == 3 and plain.conditioning == "classes"


def test_a_folder_without_captions_is_as_before(tmp_path):
    root = tmp_path / "images"
    write_images(root, folders=True)
    (root / "red" / "notes.txt").write_text("not a caption: no image is called notes")
    dm = module(root, tmp_path)
    assert not dm.captioned and dm.num_classes == 3
    with pytest.raises(NotImplementedError):
        dm.captions()


def test_images_without_captions_are_refused_or_skipped_and_counted(tmp_path, capsys):
    root = write_metadata(tmp_path / "images")
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "metadata.jsonl").write_text("\n".join(lines[2:]))  # 2 of 12 have no caption
    with pytest.raises(UsageError, match=r"2 of 12 images .* no caption .*red0.png"):
        _ = module(root, tmp_path).files
    dm = module(root, tmp_path, skip_uncaptioned=True)
    assert len(dm.files.paths) == 10 and dm.captioned
    assert "2 image(s) without a caption left out" in capsys.readouterr().out
    assert len(dm.cache().images) == 10  # only the captioned images are decoded


METADATA_ERRORS = [
    ('{"file_name": "red0.png", "text": "ok"}\n{"file_name": "red1.png", "text": "a}',
     r"metadata.jsonl line 2: not JSON"),
    ('{"file_name": "red0.png"}', r"line 1: expected an object with file_name and text, got "
                                   r"\['file_name'\]"),
    ('["red0.png", "a caption"]', r"line 1: expected an object .* got list"),
    ('{"file_name": "red0.png", "text": 3}', r"line 1: text must be a caption or a non-empty list"),
    ('{"file_name": "red0.png", "text": []}', r"line 1: text must be a caption"),
    ('{"file_name": "red0.png", "text": "  "}', r"line 1: an empty caption"),
    ('\n\n{"file_name": "cat.png", "text": "a cat"}', r"line 3: a caption for 'cat.png', which "
                                                       r"is not an image under data.root"),
    ('{"file_name": 7, "text": "a"}', r"line 1: file_name must be a path"),
    ("\n", r"metadata.jsonl holds no captions"),
]  # fmt: skip


@pytest.mark.parametrize("content, message", METADATA_ERRORS)
def test_a_malformed_metadata_jsonl_names_the_line(tmp_path, content, message):
    root = tmp_path / "images"
    write_images(root)
    (root / "metadata.jsonl").write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        _ = module(root, tmp_path).files
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_layouts_missing_or_both_are_named(tmp_path):
    root = tmp_path / "images"
    write_images(root)
    with pytest.raises(UsageError, match="has no metadata.jsonl .*init_args.captions txt"):
        _ = module(root, tmp_path, captions="metadata").files
    (root / "red0.txt").write_text("a red block")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "red0.png", "text": "a"}))
    with pytest.raises(UsageError, match="both metadata.jsonl and .txt captions .*red0.txt"):
        _ = module(root, tmp_path).files
    assert module(root, tmp_path, captions="txt", skip_uncaptioned=True).files.paths == [
        root / "red0.png"
    ]
    with pytest.raises(UsageError, match="data.captions 'jsonl'"):
        _ = module(root, tmp_path, captions="jsonl").files


TINY_DIT = [
    "--model.net.init_args.patch_size", "4", "--model.net.init_args.hidden", "16",
    "--model.net.init_args.depth", "1", "--model.net.init_args.num_heads", "2",
]  # fmt: skip
TINY_UNET = [
    "--model.net", "flowdiff.nets.unet.UNet", "--model.net.init_args.channels", "[8, 16]",
    "--model.net.init_args.norm_groups", "4", "--model.net.init_args.attention_levels", "[1]",
    "--model.net.init_args.num_heads", "2", "--model.net.init_args.time_embed_dim", "16",
]  # fmt: skip


def fit_text(root: Path, tmp_path: Path, run_cli, net: list[str], name: str = "run") -> Path:
    """images_text.yaml with nothing but the root and sizes that make it quick."""
    run = tmp_path / name
    code, _, err = run_cli(
        "fit", "--config", "images_text.yaml", "--data.init_args.root", root,
        "--data.init_args.image_size", "8", "--data.init_args.batch_size", "4",
        "--data.init_args.val_fraction", "0.25",
        "--data.init_args.cache_dir", tmp_path / "cache", "--data.init_args.decode_workers", "1",
        *net, "--model.text_encoder.init_args.dim", "8",
        "--model.text_encoder.init_args.num_heads", "2", "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3", "--trainer.default_root_dir", run,
        "--trainer.logger", "false", "--model.sampler.init_args.steps", "2",
    )  # fmt: skip
    assert code == 0, err
    return run / "checkpoints" / "last.ckpt"


def test_images_text_yaml_fits_samples_and_evaluates_a_metadata_folder(
    tmp_path, run_cli, monkeypatch
):
    from flowdiff.checkpoint import read_checkpoint

    root = write_metadata(tmp_path / "images")
    ckpt = fit_text(root, tmp_path, run_cli, TINY_DIT)
    saved = read_checkpoint(ckpt)  # weights_only=True
    assert saved["data"]["conditioning"] == "text" and saved["data"]["num_classes"] == 0
    words = {w for n in COLOURS for w in ("a", n, "block", "on", "the", *SIDES)}
    assert set(saved["hyper_parameters"]["text_encoder"]["init_args"]["vocabulary"]) == words
    net = saved["hyper_parameters"]["net"]
    assert net["class_path"] == "flowdiff.nets.dit.DiT" and net["init_args"]["text_dim"] == 8
    assert net["init_args"]["text_mode"] == "cross"

    code, _, err = run_cli(
        "sample", "--ckpt", ckpt, "--prompt", "a red block on the left", "--prompt",
        "a blue block on the right", "--guidance", "1,3", "--num-samples", "2", "--steps", "2",
        "--out", tmp_path / "s",
    )  # fmt: skip
    assert code == 0, err
    payload = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert payload["samples"].shape == (2, 4, 3, 8, 8)
    assert payload["prompts"] == ["a red block on the left"] * 2 + ["a blue block on the right"] * 2

    weights = tmp_path / "standin.pt"
    torch.jit.script(MeanColour()).save(str(weights))
    monkeypatch.setenv("FLOWDIFF_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(
        "evaluate", "--ckpt", ckpt, "--steps", "2", "--num-samples", "6", "--nll-samples", "2",
        "--nll-steps", "2", "--wandb", "false", "--inception-weights", weights,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((ckpt.parent.parent / "eval" / "seed0" / "metrics.json").read_text())
    assert [row["guidance"] for row in metrics["rows"]] == [1.0, 3.0]
    assert all({"inception_fid", "inception_kid"} <= set(r["metrics"]) for r in metrics["rows"])
    assert metrics["likelihood"]["unit"] == "bits/dim" and "null caption" in out


def test_a_text_unet_fits_and_samples_a_txt_folder(tmp_path, run_cli):
    root = tmp_path / "images"
    for name in write_images(root):
        (root / name).with_suffix(".txt").write_text(caption(name))
    ckpt = fit_text(root, tmp_path, run_cli, TINY_UNET)
    from flowdiff.checkpoint import read_checkpoint

    net = read_checkpoint(ckpt)["hyper_parameters"]["net"]
    assert net["class_path"] == "flowdiff.nets.unet.UNet" and net["init_args"]["text_dim"] == 8
    code, _, err = run_cli(
        "sample", "--ckpt", ckpt, "--prompt", "a green block on the left", "--num-samples", "2",
        "--steps", "2", "--out", tmp_path / "s",
    )  # fmt: skip
    assert code == 0, err
    payload = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert payload["samples"].shape[-4:] == (2, 3, 8, 8)
    assert payload["prompts"] == ["a green block on the left"] * 2


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "setup, message",
    [
        ("bad-line", "metadata.jsonl line 2: not JSON"),
        ("missing-file", "a caption for 'cat.png', which is not an image under data.root"),
        ("uncaptioned", "1 of 12 images under data.root have no caption in metadata.jsonl"),
        ("both", "holds both metadata.jsonl and .txt captions"),
        ("no-captions", "model.text_encoder is set but the data has no captions"),
        ("mlp", "reads no text; use a network with text_dim (flowdiff.nets.dit.DiT, "
                "flowdiff.nets.unet.UNet)"),
    ],
)  # fmt: skip
def test_bad_captioned_folders_are_one_line_exit_2_and_write_nothing(
    tmp_path, run_cli, monkeypatch, setup, message
):
    monkeypatch.chdir(tmp_path)
    root = write_metadata(tmp_path / "images")
    metadata = root / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    if setup == "bad-line":
        metadata.write_text(lines[0] + "\n{oops\n")
    elif setup == "missing-file":
        metadata.write_text("\n".join([*lines, json.dumps({"file_name": "cat.png", "text": "a"})]))
    elif setup == "uncaptioned":
        metadata.write_text("\n".join(lines[1:]))
    elif setup == "both":
        (root / "red0.txt").write_text("a red block")
    elif setup == "no-captions":
        metadata.unlink()
    extra = ["--model.net", "flowdiff.nets.mlp.MLP"] if setup == "mlp" else []
    before = snapshot(tmp_path)
    code, _, err = run_cli(
        "fit", "--config", "images_text.yaml", "--data.init_args.root", root, *extra,
        "--data.init_args.cache_dir", tmp_path / "cache", "--trainer.logger", "false",
        "--trainer.default_root_dir", tmp_path / "run",
    )  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists()
