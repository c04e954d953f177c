"""Lightning's own loop features work through `flowdiff fit` (gradient clipping, accumulation),
and configurations that would silently give garbage are refused in one line."""

from __future__ import annotations

import lightning as L
import pytest
import torch

TINY = [
    "--trainer.logger", "false",
    "--trainer.val_check_interval", "1000",
    "--data.init_args.batch_size", "32",
    "--model.net.init_args.hidden", "16",
    "--model.net.init_args.depth", "2",
    "--validation.num_samples", "50",
]  # fmt: skip


class Recorder(L.Callback):
    """Keeps the raw parameters at the start and end of training, and the batches seen."""

    runs: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.start = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        end = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        Recorder.runs.append({"moved": (end - self.start).norm().item(), "batches": self.batches,
                              "steps": trainer.global_step})  # fmt: skip


def fit(run_cli, root, *extra):
    args = ["fit", "--config", "toy.yaml", "--trainer.default_root_dir", root, *TINY, *extra]
    args += ["--trainer.callbacks+=test_training_loop.Recorder", "--ema.decay", "0.0"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    return Recorder.runs[-1]


SGD = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.1",
       "--model.lr_schedule", "constant", "--trainer.max_steps", "5"]  # fmt: skip


def test_gradient_clipping_is_lightnings(tmp_path, run_cli):
    """SGD with lr 0.1, the gradient norm clipped to 1e-4: 5 steps move the weights by at most
    5 * 0.1 * 1e-4 (the exact bound); unclipped they move far more."""
    clipped = fit(run_cli, tmp_path / "clipped", *SGD, "--trainer.gradient_clip_val", "1e-4")
    free = fit(run_cli, tmp_path / "free", *SGD)
    assert clipped["steps"] == free["steps"] == 5
    assert clipped["moved"] <= 5 * 0.1 * 1e-4 * (1 + 1e-5)
    assert clipped["moved"] > 0.5 * 5 * 0.1 * 1e-4  # the gradients are far above the cap
    assert free["moved"] > 100 * clipped["moved"]


def test_gradient_accumulation_is_lightnings(tmp_path, run_cli):
    run = fit(run_cli, tmp_path / "acc", *SGD, "--trainer.accumulate_grad_batches", "2",
              "--trainer.gradient_clip_val", "1.0")  # fmt: skip
    assert run["steps"] == 5 and run["batches"] == 10  # two batches an optimizer step


def test_cosine_schedule_reaches_zero_with_accumulation(tmp_path, run_cli):
    """The schedule moves every 10 optimizer steps, however many batches make a step."""
    root = tmp_path / "cos"
    fit(run_cli, root, "--trainer.max_steps", "40", "--trainer.accumulate_grad_batches", "2")
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 40
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "flag, value, word",
    [
        ("--model.path.init_args.t_min", "0", "t_min"),
        ("--model.path.init_args.t_max", "1", "t_max"),
    ],
)
def test_noise_prediction_refuses_the_ends_of_the_path(tmp_path, run_cli, flag, value, word):
    root = tmp_path / "run"
    code, _, err = run_cli("fit", "--config", "toy_csm.yaml", "--trainer.default_root_dir", root,
                           *TINY, flag, value)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("flowdiff: error: ") and word in err
    assert not root.exists()


def test_guidance_on_a_model_without_label_dropout_is_refused(tmp_path, run_cli):
    """Its null label was never trained: guidance w != 1 would use an untrained embedding."""
    root = tmp_path / "cond"
    labels = ["--model.net.init_args.num_classes", "2", "--data.init_args.batches_per_epoch", "5"]
    code, _, err = run_cli("fit", "--config", "toy.yaml", "--trainer.default_root_dir", root,
                           *TINY, *labels, "--validation.guidance", "[1, 3]")  # fmt: skip
    assert code == 2 and "p_uncond" in err and len(err.strip().splitlines()) == 1, err
    assert not root.exists()
    fit(run_cli, root, *labels, "--trainer.max_steps", "5")
    ckpt = root / "checkpoints" / "last.ckpt"
    for command in ("sample", "evaluate"):
        code, _, err = run_cli(command, "--ckpt", ckpt, "--guidance", "3", "--out", tmp_path / "o")
        assert code == 2 and "p_uncond" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
    code, _, err = run_cli("sample", "--ckpt", ckpt, "--guidance", "1", "--num-samples", "20",
                           "--out", tmp_path / "ok")  # fmt: skip
    assert code == 0, err


class CheckpointSpy(L.Callback):
    """Notes, at every step, the step of the last.ckpt on disk (None: there is none)."""

    seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = trainer.checkpoint_callback.dirpath + "/last.ckpt"
        try:
            step = torch.load(last, weights_only=True)["global_step"]
        except FileNotFoundError:
            step = None
        CheckpointSpy.seen.append((trainer.global_step, step))


def test_checkpoints_by_time_before_any_validation(tmp_path, run_cli):
    """A run killed before its first validation must have something to resume from: last.ckpt
    is also written every train_time_interval (a minute by default)."""
    CheckpointSpy.seen = []
    root = tmp_path / "run"
    args = ["--trainer.max_steps", "60", "--checkpoint.train_time_interval", "0:00:00.05",
            "--trainer.callbacks+=test_training_loop.CheckpointSpy"]  # fmt: skip
    fit(run_cli, root, *args)
    during = [step for now, step in CheckpointSpy.seen if now < 60 and step is not None]
    assert during, CheckpointSpy.seen  # checkpoints appeared while training, with no validation
    assert all(0 < step <= now for now, step in CheckpointSpy.seen if step is not None)


def test_time_checkpoints_give_way_to_a_step_interval(tmp_path, run_cli):
    root = tmp_path / "run"
    fit(run_cli, root, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2")
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_coupling_and_time_sampling_train_and_are_recorded(tmp_path, run_cli):
    """A conditional run with label dropout, OT coupling and logit-normal times trains, and its
    checkpoint rebuilds both."""
    from flowdiff.checkpoint import load_run

    root = tmp_path / "ot"
    fit(run_cli, root, "--trainer.max_steps", "5", "--model.coupling", "ot",
        "--model.objective", "flowdiff.objectives.ConditionalFlowMatching",
        "--model.path.init_args.time_sampling", "logit-normal",
        "--model.net.init_args.num_classes", "2", "--data.init_args.p_uncond", "0.2")  # fmt: skip
    ckpt = root / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["coupling"] == "ot"
    assert hparams["path"]["init_args"]["time_sampling"] == "logit-normal"
    model = load_run(ckpt).model
    assert repr(model.coupling) == "ExactOTCoupling()"
    assert repr(model.path.time_sampling) == "LogitNormalTime(mean=0.0, std=1.0)"
