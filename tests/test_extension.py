"""Extending flowdiff touches nothing in flowdiff/: a network, a dataset, a schedule and a sampler
defined here run through `fit`, `sample` and `evaluate` by class_path; and a model built in plain
Python writes a checkpoint that `sample` and `evaluate` load."""

from __future__ import annotations

import json
import math

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from flowdiff.config import Recorded
from flowdiff.data.base import FlowDataModule
from flowdiff.data.evaluators import PointEvaluator
from flowdiff.samplers import ODESampler
from flowdiff.samplers.ode import combine
from flowdiff.schedules import Schedule, ScheduleOutput


class TinyNet(Recorded, nn.Module):
    """An MLP on (x, t): the network contract, nothing more."""

    def __init__(self, dim: int = 2, hidden: int = 32, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.body(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


class QuietPointEvaluator(PointEvaluator):
    """Points whose evaluator measures no straightness unless told (the data says what its
    evaluation measures by default, not the rank of its samples)."""

    measures_straightness = False


class RingData(FlowDataModule):
    """Points on a ring of radius ``radius`` with a little noise."""

    def __init__(self, radius: float = 2.0, batch_size: int = 64, batches: int = 20):
        super().__init__()
        self.save_hyperparameters()
        self.data_shape, self.num_classes = (2,), 0

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        angle = 2 * math.pi * torch.rand(n, generator=g)
        x = self.hparams.radius * torch.stack([angle.cos(), angle.sin()], 1)
        return x + 0.05 * torch.randn(n, 2, generator=g), torch.zeros(n, dtype=torch.long)

    def evaluator(self, options=None) -> PointEvaluator:
        return QuietPointEvaluator(self.reference)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        batches = [self.reference(hp.batch_size, seed) for seed in range(hp.batches)]
        return DataLoader(batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.reference(256, 10_000)], batch_size=None)


class QuadraticSchedule(Schedule):
    """``alpha_t = t``, ``beta_t = (1 - t)^2``."""

    def __call__(self, t: Tensor) -> ScheduleOutput:
        return ScheduleOutput(t, (1 - t) ** 2, torch.ones_like(t), -2 * (1 - t))


class RalstonSampler(ODESampler):
    """Ralston's second-order method: slopes at t and at t + 2h/3."""

    def step(self, f, y, t, t_next, last):
        h = t_next - t
        k1 = f(t, y)
        k2 = f(t + 2 * h / 3, y + 2 * h / 3 * k1)
        return combine(y, h, [k1, k2], [0.25, 0.75])


CONFIG = """
trainer: {max_steps: 40, val_check_interval: 20, check_val_every_n_epoch: null, logger: false}
model:
  net: {class_path: test_extension.TinyNet, init_args: {hidden: 32}}
  path:
    schedule: {class_path: test_extension.QuadraticSchedule}
    t_max: 0.99
  objective: flowdiff.objectives.ConditionalFlowMatching
  sampler: {class_path: test_extension.RalstonSampler, init_args: {steps: 6}}
data: {class_path: test_extension.RingData, init_args: {radius: 1.5}}
validation: {num_samples: 100}
"""


def test_new_parts_run_through_fit_sample_and_evaluate(tmp_path, run_cli):
    config = tmp_path / "ring.yaml"
    config.write_text(CONFIG)
    root = tmp_path / "run"
    code, _, err = run_cli("fit", "--config", config, "--trainer.default_root_dir", root)
    assert code == 0, err
    ckpt = root / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["data"]["class_path"] == "test_extension.RingData"
    assert (root / "samples" / "val_step0000040.png").is_file()

    code, out, err = run_cli("sample", "--ckpt", ckpt, "--num-samples", 50, "--out", tmp_path / "s")
    assert code == 0, err
    samples = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert samples["samples"].shape == (50, 2)
    assert samples["sampler"] == "RalstonSampler(steps=6)"
    assert samples["nfe"] == 12  # counted by the field: 2 a step

    args = ["--num-samples", 100, "--nll-samples", 20, "--nll-steps", 2, "--wandb", "false"]
    args += ["--sampler", "test_extension.RalstonSampler,euler", "--steps", "4"]
    code, _, err = run_cli("evaluate", "--ckpt", ckpt, *args, "--out", tmp_path / "e")
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in report["rows"]] == [
        ("RalstonSampler(steps=4)", 8),
        ("EulerSampler(steps=4)", 4),
    ]
    assert all(math.isfinite(r["metrics"]["w2"]) for r in report["rows"])
    assert math.isfinite(report["likelihood"]["nll"])
    assert report.get("straightness") is None  # the evaluator's default, though points are 1-D


def test_a_model_built_in_python_writes_a_checkpoint_the_commands_load(tmp_path, run_cli):
    from flowdiff.data.toy import ToyDataModule
    from flowdiff.module import FlowModule
    from flowdiff.nets.mlp import MLP
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath
    from flowdiff.samplers import EulerMaruyamaSampler

    model = FlowModule(
        MLP(hidden=32, depth=2),
        GaussianConditionalPath("cosine"),
        ConditionalFlowMatching(),
        EulerMaruyamaSampler(steps=10, sigma=0.5),
    )
    data = ToyDataModule("8gaussians", batch_size=64, batches_per_epoch=30)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, data)
    ckpt = tmp_path / "run" / "checkpoints" / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    code, out, err = run_cli("sample", "--ckpt", ckpt, "--num-samples", 40, "--out", tmp_path / "s")
    assert code == 0, err
    saved = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    # the checkpoint's own sampler, with all its arguments: sigma stays 0.5
    assert saved["sampler"] == "EulerMaruyamaSampler(steps=10, sigma=0.5, sigma_schedule='beta')"
    code, _, err = run_cli("evaluate", "--ckpt", ckpt, "--num-samples", 100, "--nll", "false",
                           "--wandb", "false", "--out", tmp_path / "e")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["rows"][0]["sampler"] == saved["sampler"]


def test_a_network_that_cannot_describe_itself_is_named_when_saving(tmp_path):
    import pytest

    from flowdiff.data.toy import ToyDataModule
    from flowdiff.module import FlowModule
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath
    from flowdiff.utils import UsageError

    class Plain(nn.Module):  # not Recorded: nothing remembers its arguments
        num_classes = 0

        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def forward(self, x, t, y=None):
            return self.layer(torch.cat([x, t[:, None]], 1))

    model = FlowModule(Plain(), GaussianConditionalPath(), ConditionalFlowMatching())
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, ToyDataModule(batch_size=8, batches_per_epoch=2))
    with pytest.raises(UsageError, match="cannot write Plain into a checkpoint"):
        trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert not (tmp_path / "plain.ckpt").exists()
