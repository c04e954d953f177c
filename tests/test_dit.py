"""The DiT's contract: shapes, labels and the null class, adaLN-Zero, autocast, batch independence,
parameter counts, errors; and a DiT trained by `flowdiff fit` on fake MNIST."""

import pytest
import torch
from test_mnist_data import write_fake_mnist

from flowdiff.nets.dit import DiT, sincos_2d
from flowdiff.utils import UsageError


def small(**kwargs) -> DiT:
    """A two-block net small enough for fast tests (28x28 grey, 4x4 patches: 49 tokens of 32)."""
    config = dict(patch_size=4, hidden=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=3)
    return DiT(**{**config, **kwargs})


def perturbed(net: DiT) -> DiT:
    """Move every weight off its initial value, so the zero-initialised branches contribute."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def num_parameters(net: DiT) -> int:
    return sum(p.numel() for p in net.parameters())


def inputs(batch: int = 4, in_channels: int = 1, size=(28, 28), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *size, generator=gen)
    return x, torch.rand(batch, generator=gen)


@pytest.mark.parametrize(
    ("in_channels", "image_size", "patch_size"),
    [(1, 28, 1), (1, 28, 2), (1, 28, 4), (1, 28, 7), (3, 32, 4), (3, [16, 24], 2), (1, [8, 12], 4)],
)
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_shapes_with_and_without_labels(in_channels, image_size, patch_size, pos_embed):
    net = perturbed(
        small(in_channels=in_channels, image_size=image_size, patch_size=patch_size,
              pos_embed=pos_embed)
    )  # fmt: skip
    size = [image_size] * 2 if isinstance(image_size, int) else image_size
    x, t = inputs(3, in_channels, size)
    out = net(x, t)
    assert out.shape == x.shape
    assert net(x, t, torch.tensor([0, 1, 3])).shape == x.shape
    assert torch.isfinite(out).all()


def test_unpatchify_inverts_patchify():
    """With the blocks removed and the output projection the inverse of the patch embedding,
    the net is the identity on images: patches go back where they came from."""
    net = small(in_channels=3, image_size=[8, 12], patch_size=4, hidden=48, depth=1)
    net.blocks = torch.nn.ModuleList()
    net.pos.zero_()
    with torch.no_grad():
        net.patch_embed.weight.copy_(torch.eye(48))
        net.patch_embed.bias.zero_()
        net.output.weight.copy_(torch.eye(48))
    net.final_norm = torch.nn.Identity()
    x, t = inputs(2, 3, (8, 12))
    torch.testing.assert_close(net(x, t), x)


def test_sincos_embedding_closed_form():
    pos = sincos_2d(2, 3, 8)  # 6 tokens, 2 frequencies: 1 and 1 / 100
    assert pos.shape == (6, 8)
    i, j = 1, 2  # token 5 in row-major order
    w = torch.tensor([1.0, 0.01])
    expected = torch.cat([(i * w).sin(), (i * w).cos(), (j * w).sin(), (j * w).cos()])
    torch.testing.assert_close(pos[i * 3 + j], expected)
    torch.testing.assert_close(pos[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))


def test_zero_init_gives_zero_output_until_a_step():
    net = small()
    x, t = inputs()
    y = torch.tensor([0, 1, 2, 3])
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    (net(x, t, y) - x).square().mean().backward()
    optimizer.step()
    assert net(x, t, y).abs().min() > 0


def test_label_table_and_time_mlp_start_at_the_papers_normal():
    """DiT's initialisation: the label table and the time MLP's weights N(0, 0.02^2), the MLP's
    biases 0, so neither term of ``c = time + label`` swamps the other at the adaLN. With n
    draws the sample std is within 0.02 / sqrt(2 n) (one standard error) of 0.02: 10% is > 6 of
    them for the smallest tensor here (11 x 192 entries); nn.Embedding's N(0, 1) and nn.Linear's
    default (std 1 / sqrt(3 * 192) = 0.042) are far outside."""
    torch.manual_seed(0)
    net = DiT(hidden=192, num_classes=10)
    linears = [m for m in net.time_embed.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2
    for weight in [net.label_embed.embedding.weight, *(m.weight for m in linears)]:
        assert abs(weight.std().item() - 0.02) < 0.002
        assert abs(weight.mean().item()) < 5 * 0.02 / weight.numel() ** 0.5
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_null_label_and_label_effect():
    net = perturbed(small(num_classes=3))
    x, t = inputs()
    out_null = net(x, t)
    # y=None means the null label, index num_classes
    torch.testing.assert_close(net(x, t, torch.full((4,), 3)), out_null, rtol=0, atol=0)
    out_0, out_1 = net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t, torch.ones(4).long())
    assert not torch.allclose(out_0, out_1)
    assert not torch.allclose(out_0, out_null)


def test_time_changes_output():
    net = perturbed(small())
    x, t = inputs()
    assert not torch.allclose(net(x, t), net(x, 1.0 - t))


def test_unconditional_net_ignores_labels():
    net = perturbed(small(num_classes=0))
    assert net.num_classes == 0 and net.label_embed is None
    x, t = inputs()
    torch.testing.assert_close(net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t))


def test_batch_independence():
    net = perturbed(small()).eval()
    x, t = inputs(batch=5)
    y = torch.tensor([0, 1, 2, 3, 0])
    out = net(x, t, y)
    x2, t2 = inputs(batch=5, seed=1)
    x2[2], t2[2] = x[2], t[2]
    y2 = torch.tensor([3, 3, 2, 1, 1])
    torch.testing.assert_close(net(x2, t2, y2)[2], out[2])
    torch.testing.assert_close(net(x[2:3], t[2:3], y[2:3])[0], out[2])
    # and the gradient of sample 2's output reaches no other sample
    x = x.clone().requires_grad_()
    net(x, t, y)[2].sum().backward()
    assert x.grad[[0, 1, 3, 4]].abs().max() == 0 and x.grad[2].abs().max() > 0


def test_bf16_autocast_runs_and_stays_close():
    net = perturbed(small())
    x, t = inputs()
    out = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = net(x.to(memory_format=torch.channels_last), t)
    out_bf16.float().square().mean().backward()
    assert out_bf16.shape == x.shape and out_bf16.dtype == torch.bfloat16
    assert torch.isfinite(out_bf16).all()
    assert (out_bf16.float() - out).abs().max() < 0.05 * out.abs().max()


def test_gradients_reach_every_parameter():
    net = perturbed(small(pos_embed="learned"))
    x, t = inputs()
    net(x, t, torch.tensor([0, 1, 2, 3])).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def expected_parameters(c, p, e, depth, m, classes, tokens=0) -> int:
    """Parameters by hand: weights and biases of every Linear, the label table, the positions."""
    time = 2 * (e * e + e)  # the time embedding's MLP
    labels = (classes + 1) * e if classes else 0
    patch = p * p * c * e + e
    block = (6 * e * e + 6 * e) + (3 * e * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
    final = (2 * e * e + 2 * e) + (e * p * p * c + p * p * c)
    return time + labels + patch + tokens * e + depth * block + final


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"hidden": 64, "depth": 3},
        {"in_channels": 3, "image_size": [16, 24], "patch_size": 2, "num_classes": 0},
        {"mlp_ratio": 3.0, "pos_embed": "learned"},
    ],
)
def test_parameter_count(kwargs):
    net = small(**kwargs)
    config = {"in_channels": 1, "image_size": 28, "patch_size": 4, "hidden": 32, "depth": 2,
              "mlp_ratio": 2.0, "num_classes": 3, "pos_embed": "sincos", **kwargs}  # fmt: skip
    size = config["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    p, e = config["patch_size"], config["hidden"]
    tokens = (h // p) * (w // p) if config["pos_embed"] == "learned" else 0
    expected = expected_parameters(
        config["in_channels"], p, e, config["depth"], int(e * config["mlp_ratio"]),
        config["num_classes"], tokens,
    )  # fmt: skip
    assert num_parameters(net) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 3}, r"image size 28 is not a multiple of patch_size 3; .*\[1, 2, 4, 7"),
        ({"image_size": [28, 30], "patch_size": 4}, "image size 30 is not a multiple"),
        ({"image_size": [28, 0]}, "image_size must be a positive int or"),
        ({"image_size": [28, 28, 3]}, "image_size must be a positive int or"),
        ({"patch_size": 0}, "patch_size must be >= 1"),
        ({"in_channels": 0}, "in_channels"),
        ({"depth": 0}, "depth"),
        ({"num_heads": 3}, "num_heads=3 must divide hidden=32"),
        ({"hidden": 6, "num_heads": 2}, "multiple of 4 for pos_embed 'sincos'"),
        ({"hidden": 7, "num_heads": 1, "pos_embed": "learned"}, "hidden must be even"),
        ({"pos_embed": "rope"}, "unknown pos_embed 'rope'"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"num_classes": -1}, "num_classes"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(UsageError, match=message):
        small(**kwargs)


@pytest.mark.parametrize(
    ("channels", "size", "fix"),
    [
        (3, (28, 28), "in_channels 3"),
        (1, (32, 32), r"image_size \[32, 32\]"),
        (3, (28, 32), r"in_channels 3 and image_size \[28, 32\]"),
    ],
)
def test_wrong_image_shape_says_what_to_set(channels, size, fix):
    net = small()
    with pytest.raises(UsageError, match=rf"built for images of shape \[1, 28, 28\] but got .*; "
                       rf"set model.net.init_args {fix}$"):  # fmt: skip
        net(*inputs(2, channels, size))


TINY_DIT = [
    "--model.net.init_args.hidden", "16",
    "--model.net.init_args.depth", "1",
    "--model.net.init_args.num_heads", "2",
    "--model.sampler.init_args.steps", "2",
    "--validation.num_samples", "10",
    "--data.init_args.batch_size", "8",
    "--data.init_args.val_size", "10",
    "--data.init_args.download", "false",
    "--trainer.logger", "false",
    "--trainer.limit_val_batches", "1",
]  # fmt: skip


def test_fit_then_sample_with_the_dit_config(run_cli, tmp_path):
    data = tmp_path / "data"
    write_fake_mnist(data)
    root = tmp_path / "run"
    code, _, err = run_cli(
        "fit", "--config", "mnist_dit.yaml", "--data.init_args.data_dir", data,
        "--trainer.default_root_dir", root, "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3", *TINY_DIT,
    )  # fmt: skip
    assert code == 0, err
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["class_path"] == "flowdiff.nets.dit.DiT"
    assert ckpt["global_step"] == 3
    out = tmp_path / "out"
    code, _, err = run_cli(
        "sample", "--ckpt", root / "checkpoints" / "last.ckpt", "--guidance", "2",
        "--per-class", "1", "--steps", "2", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    samples = torch.load(out / "samples.pt", weights_only=True)["samples"]
    assert samples.shape[-3:] == (1, 28, 28) and torch.isfinite(samples).all()


def test_fit_refuses_a_patch_size_that_does_not_divide(run_cli, tmp_path):
    code, _, err = run_cli(
        "fit", "--config", "mnist_dit.yaml", "--trainer.default_root_dir", tmp_path / "run",
        "--model.net.init_args.patch_size", "3", "--trainer.logger", "false",
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        "flowdiff: error: image size 28 is not a multiple of patch_size 3; choose a patch_size "
        "in [1, 2, 4, 7, 14, 28]"
    ]
    assert not (tmp_path / "run").exists()
