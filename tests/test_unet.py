"""The U-Net's contract: shapes, labels and the null class, memory formats, autocast, errors."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flowdiff.nets.unet import UNet


def small(**kwargs) -> UNet:
    """A three-level net small enough for fast tests (28 -> 14 -> 7, 32 -> 16 -> 8)."""
    config = dict(channels=(8, 16, 16), num_res_blocks=1, time_embed_dim=16, num_classes=3)
    return UNet(**{**config, "norm_groups": 4, **kwargs})


def perturbed(net: UNet) -> UNet:
    """Move every weight off its initial value, so the zero-initialised branches contribute."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def num_parameters(net: UNet) -> int:
    return sum(p.numel() for p in net.parameters())


def inputs(batch: int = 4, in_channels: int = 1, size: int = 28, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=gen)
    return x, torch.rand(batch, generator=gen)


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_shapes_with_and_without_labels(size, in_channels, batch):
    net = small(in_channels=in_channels)
    x, t = inputs(batch, in_channels, size)
    assert net(x, t).shape == x.shape
    assert net(x, t, torch.randint(0, 4, (batch,))).shape == x.shape


def test_odd_sizes_round_trip():
    net = perturbed(small())
    x = torch.randn(2, 1, 15, 9)
    assert net(x, torch.rand(2)).shape == x.shape


def test_zero_init_starts_at_zero_output():
    x, t = inputs()
    assert torch.equal(small()(x, t), torch.zeros_like(x))
    assert small(zero_init=False)(x, t).abs().sum() > 0


def test_null_label_and_label_effect():
    net = perturbed(small(num_classes=3))
    x, t = inputs()
    out_null = net(x, t)
    # y=None means the null label, index num_classes
    torch.testing.assert_close(net(x, t, torch.full((4,), 3)), out_null)
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
    out = net(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(net(x, t, torch.zeros(4, dtype=torch.long)), out)


def test_default_size_and_cost():
    net = UNet(num_classes=10)
    assert net.num_classes == 10 and net.channels == [32, 64, 128]
    assert 1e6 <= num_parameters(net) <= 3e6
    x, t = inputs(batch=1)
    with FlopCounterMode(display=False) as counter:
        out = net(x, t, torch.tensor([10]))
    assert out.shape == x.shape
    # Convolution FLOPs per the layout in flowdiff/nets/unet.py: 2 * H_out W_out C_in C_out 3^2.
    c0, c1, c2, n = 32, 64, 128, 2

    def conv(side: int, c_in: int, c_out: int) -> int:
        return 2 * side * side * c_in * c_out * 9

    expected = (
        conv(28, 1, c0)  # input
        + 2 * n * 2 * (conv(28, c0, c0) + conv(14, c1, c1))  # encoder and decoder blocks
        + n * 2 * conv(7, c2, c2)  # midcoder
        + conv(14, c0, c1) + conv(7, c1, c2)  # down
        + conv(7, c2, c1) + conv(14, c1, c0)  # up, at the coarse resolution
        + conv(28, c0, 1)  # output
    )  # fmt: skip
    assert counter.get_flop_counts()["Global"][torch.ops.aten.convolution] == expected
    assert expected < 0.33e9


def test_channels_last_matches_contiguous():
    net = perturbed(small(attention_levels=[2]))
    x, t = inputs()
    y = torch.tensor([0, 1, 2, 3])
    out = net(x, t, y)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x_cl, t, y), out, atol=1e-5, rtol=1e-4)
    net_cl = net.to(memory_format=torch.channels_last)
    out_cl = net_cl(x_cl, t, y)
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-4)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


class ConvNet(torch.nn.Module):
    """A convolution on (B, 2, 8, 8) images that records the layout of its inputs; it states a
    ``memory_format`` only when given one."""

    num_classes = 0

    def __init__(self, memory_format: torch.memory_format | None = None):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        if memory_format is not None:
            self.memory_format = memory_format
        self.inputs_channels_last: list[bool] = []

    def forward(self, x, t, y=None):
        self.inputs_channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.conv(x)


@pytest.mark.parametrize("stated", [None, torch.channels_last])
def test_the_network_chooses_its_memory_format(stated):
    """The module puts a network's weights, training inputs and sampling noise in the layout the
    network states, and leaves one that states none contiguous, whatever the rank of the data
    (it used to put every network on 4-D data in channels_last)."""
    from flowdiff.module import FlowModule
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath
    from flowdiff.samplers import EulerSampler

    net = ConvNet(stated)
    model = FlowModule(net, GaussianConditionalPath(), ConditionalFlowMatching(), EulerSampler(1),
                       data_shape=[2, 8, 8])  # fmt: skip
    channels_last = stated is torch.channels_last
    assert model.memory_format == (stated or torch.contiguous_format)
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    model.loss(torch.randn(4, 2, 8, 8), torch.zeros(4, dtype=torch.long))
    model.sample(3)
    assert net.inputs_channels_last == [channels_last, channels_last]
    assert UNet.memory_format is torch.channels_last


def test_bf16_autocast_runs_and_stays_close():
    net = perturbed(small(attention_levels=[1]))
    x, t = inputs()
    out = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = net(x.to(memory_format=torch.channels_last), t)
    out_bf16.float().square().mean().backward()
    assert out_bf16.shape == x.shape and torch.isfinite(out_bf16).all()
    scale = out.abs().max()
    assert (out_bf16.float() - out).abs().max() < 0.05 * scale


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_gradients_reach_every_parameter(norm):
    net = perturbed(small(attention_levels=[0, 2], norm=norm, dropout=0.1))
    x, t = inputs()
    net(x, t, torch.tensor([0, 1, 2, 3])).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("level", [0, 2])
def test_attention_level_adds_blocks(level):
    plain, attended = small(), small(attention_levels=[level])
    c = plain.channels[level]
    stages = 1 if level == len(plain.channels) - 1 else 2  # the midcoder, else encoder + decoder
    # GroupNorm (2c) + qkv (3c^2 + 3c) + output projection (c^2 + c) per attention block
    extra = stages * (4 * c * c + 6 * c)
    assert num_parameters(attended) - num_parameters(plain) == extra
    x, t = inputs()
    assert perturbed(attended)(x, t).shape == x.shape


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": []}, "channels must be a non-empty list"),
        ({"channels": [8, 0]}, "channels must be a non-empty list"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"time_embed_dim": 15}, "time_embed_dim"),
        ({"num_classes": -1}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm": "layer"}, "unknown norm 'layer'"),
        ({"norm_groups": 3}, "norm_groups=3 must divide"),
        ({"attention_levels": [3]}, r"attention_levels \[3\] out of range"),
        ({"attention_levels": [0], "num_heads": 3}, "num_heads=3 must divide"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_colour_images_at_32_64_and_128_pixels(size):
    net = UNet(in_channels=3, channels=[8, 16, 32], num_res_blocks=1, norm_groups=4, num_classes=5)
    x = torch.randn(2, 3, size, size)
    out = net(x, torch.rand(2), torch.tensor([0, 5]))
    assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()
