"""The MLP's contract, the EMA callback's decay and the metrics a fit logs."""

import pytest
import torch

from flowdiff.callbacks import EMA, ema_decay
from flowdiff.nets.mlp import MLP


@pytest.mark.parametrize("num_classes", [0, 3])
def test_mlp_shapes_and_labels(num_classes):
    net = MLP(dim=2, hidden=32, depth=2, time_embed_dim=16, num_classes=num_classes)
    x, t = torch.randn(5, 2), torch.rand(5)
    out = net(x, t)
    assert out.shape == x.shape
    if num_classes:
        y = torch.tensor([0, 1, 2, 3, 0])  # 3 is the null label
        out_y = net(x, t, y)
        assert out_y.shape == x.shape
        # y=None means the null label
        torch.testing.assert_close(net(x, t, torch.full((5,), 3)), out)
        assert not torch.allclose(out_y[:3], out[:3])


def test_ema_decay_warms_up():
    assert ema_decay(0.999, 10, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 10, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10, 100_000) == 0.999
    # the weight left on the first iterate after 1,100 updates: fixed decay vs warm-up
    fixed = 0.999**1100
    warm = torch.tensor([ema_decay(0.999, 10, n) for n in range(1, 1101)]).prod().item()
    assert fixed > 0.3 and warm < 1e-6


def test_ema_update_is_lerp_with_warm_decay():
    ema = EMA(decay=0.9, warmup=10)
    fn = ema._kwargs["multi_avg_fn"]
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    fn(avg, cur, torch.tensor(5))
    d = min(0.9, 6 / 15)
    torch.testing.assert_close(avg[0], torch.full((3,), 1 - d))
    every10 = EMA(update_every_n_steps=10)
    assert [i for i in range(30) if every10.should_update(step_idx=i)] == [9, 19, 29]
    assert not every10.should_update(epoch_idx=0)


def test_ema_update_equals_lightnings_averaged_model_value_for_value():
    # flowdiff's update replaces AveragedModel.update_parameters (the lists built once, the
    # count mirrored on the host); it must leave the same parameters, buffers and count, from
    # the first update (a copy) through the warm-up, and again after the count is reloaded.
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(decay=0.9, warmup=3)
    ema._average_model = AveragedModel(model, use_buffers=False, **ema._kwargs)
    reference = AveragedModel(model, use_buffers=False, **ema._kwargs)

    def same():
        for a, b in zip(ema._average_model.state_dict().values(), reference.state_dict().values(),
                        strict=True):  # fmt: skip
            assert torch.equal(a, b)

    for step in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # BatchNorm's running statistics move: buffers to copy
        ema._update(model)
        reference.update_parameters(model)
        same()
        if step == 5:  # a resumed fit: the count comes from the checkpoint, the lists are rebuilt
            ema._tensors = ema._count = None
    assert int(ema._average_model.n_averaged) == 12
    assert not torch.equal(ema._average_model.module[0].weight, model[0].weight)


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"update_every_n_steps": 0}])
def test_ema_bad_arguments(kwargs):
    from flowdiff.utils import UsageError

    with pytest.raises(UsageError):
        EMA(**kwargs)


def test_fit_logs_learning_rate_and_samples_per_second(tmp_path, run_cli):
    """What W&B shows beside the loss: the learning rate and the training samples/s (here through
    Lightning's CSV logger: the same metrics, offline)."""
    import csv

    root = tmp_path / "run"
    code, _, err = run_cli(
        "fit", "--config", "toy.yaml", "--trainer.default_root_dir", root,
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", root,
        "--trainer.max_steps", 10, "--trainer.log_every_n_steps", 5,
        "--trainer.limit_val_batches", 0,
        "--model.net.init_args.hidden", 16, "--data.init_args.batch_size", 32,
    )  # fmt: skip
    assert code == 0, err
    (metrics,) = root.glob("lightning_logs/*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    lr = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    rate = [float(r["train/samples_per_sec"]) for r in rows if r.get("train/samples_per_sec")]
    assert lr and lr[0] == pytest.approx(1e-2)  # toy.yaml's rate at the start of the cosine
    assert len(rate) == 2 and all(r > 0 for r in rate)  # steps 5 and 10
