"""A captioned dataset through the commands: fit gives captioned data a trained text encoder with
its vocabulary in the checkpoint, sample --prompt reads it back from the checkpoint alone, and
bad prompts or flags are one line each."""

import pytest
import torch

from flowdiff.checkpoint import load_run, read_checkpoint

SIDES = ["top left", "top right", "bottom left", "bottom right"]


def squares(n: int = 128) -> tuple[torch.Tensor, list[str]]:
    """8x8 images, one white 4x4 quadrant each, captioned by where it is."""
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    text = []
    for i in range(n):
        k = i % 4
        rows, cols = slice(4 * (k // 2), 4 * (k // 2) + 4), slice(4 * (k % 2), 4 * (k % 2) + 4)
        x[i, 0, rows, cols] = 255
        text.append(f"a square at the {SIDES[k]}")
    return x, text


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from flowdiff.cli import main

    tmp = tmp_path_factory.mktemp("text")
    x, text = squares()
    torch.save({"x": x, "text": text}, tmp / "squares.pt")
    run = tmp / "run"
    main([
        "fit", "--config", "images.yaml", "--model.net", "flowdiff.nets.dit.DiT",
        "--model.net.init_args.patch_size", "4", "--model.net.init_args.hidden", "16",
        "--model.net.init_args.depth", "1", "--model.net.init_args.num_heads", "2",
        "--model.text_encoder", "flowdiff.text.TrainedTextEncoder",
        "--model.text_encoder.init_args.dim", "8", "--model.text_encoder.init_args.num_heads", "2",
        "--data", "flowdiff.data.pairs.TensorPairsDataModule",
        "--data.init_args.path", str(tmp / "squares.pt"), "--data.init_args.batch_size", "32",
        "--trainer.max_steps", "4", "--trainer.default_root_dir", str(run),
        "--trainer.logger", "false", "--model.sampler.init_args.steps", "2",
        "--validation.prompts", '["a square at the top left"]', "--trainer.val_check_interval", "2",
    ])  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def test_fit_records_the_text_encoder_and_its_vocabulary_in_the_checkpoint(text_run):
    ckpt = read_checkpoint(text_run)  # weights_only=True
    encoder = ckpt["hyper_parameters"]["text_encoder"]
    assert encoder["class_path"] == "flowdiff.text.TrainedTextEncoder"
    words = {"a", "square", "at", "the", "top", "bottom", "left", "right"}
    assert set(encoder["init_args"]["vocabulary"]) == words
    assert ckpt["hyper_parameters"]["net"]["init_args"]["text_dim"] == 8
    assert ckpt["data"]["conditioning"] == "text" and ckpt["data"]["p_uncond"] == 0.1
    model = load_run(text_run).model
    assert model.reads_text and model.text_encoder.tokenizer.vocabulary == list(
        encoder["init_args"]["vocabulary"]
    )
    pictures = list((text_run.parent.parent / "samples").glob("val_step*.png"))
    assert pictures


def test_sample_writes_n_samples_a_prompt_with_their_prompts(text_run, tmp_path, run_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a square at the bottom right\n\n")
    code, out, err = run_cli(
        "sample", "--ckpt", text_run, "--prompt", "a square at the top left",
        "--prompts-file", prompts, "--guidance", "1,3", "--num-samples", "3", "--steps", "2",
        "--out", tmp_path / "s",
    )  # fmt: skip
    assert code == 0, err
    payload = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert payload["samples"].shape == (2, 6, 1, 8, 8)
    assert (
        payload["prompts"]
        == ["a square at the top left"] * 3 + ["a square at the bottom right"] * 3
    )
    assert payload["labels"] is None and payload["guidance"] == [1.0, 3.0]
    assert (tmp_path / "s" / "samples.png").is_file()


def test_prompts_the_encoder_cannot_read_are_warned_about(text_run, tmp_path, run_cli):
    code, _, err = run_cli(
        "sample", "--ckpt", text_run, "--prompt", "a purple square at the top left",
        "--num-samples", "1", "--steps", "1", "--out", tmp_path / "w",
    )  # fmt: skip
    assert code == 0, err
    assert "warning: words the text encoder never saw" in err and "purple" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--labels", "0"], "this model conditions on text; use --prompt"),
        (["--guidance", "3"], "guidance on a text model needs prompts"),
        (["--prompt", ""], "an empty prompt"),
    ],
)
def test_bad_flags_for_a_text_model_are_one_line(text_run, tmp_path, run_cli, flags, message):
    code, _, err = run_cli("sample", "--ckpt", text_run, "--out", tmp_path / "x", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_reflow_refuses_a_text_teacher_in_one_line(text_run, tmp_path, run_cli):
    code, _, err = run_cli(
        "reflow", "--ckpt", text_run, "--out", tmp_path / "pairs.pt", "--num-pairs", "10"
    )
    assert code == 2 and "is a text model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pairs.pt").exists()
