"""The U-Net reads text as the DiT does (tests/test_text.py): pooled text into its embedding,
cross-attention to the tokens at its attention levels through the project's one attention
(padding masked, samples independent), y=None the null caption, zero-initialised branches."""

import pytest
import torch

from flowdiff.nets.transformer import CrossAttention
from flowdiff.nets.unet import UNet
from flowdiff.nets.unet_blocks import SelfAttention
from flowdiff.testing import pad_with_garbage, random_text_condition
from flowdiff.text import TextCondition
from flowdiff.utils import UsageError

WIDTH = 16  # the text encoder's width


def text_unet(attention_levels=(0, 1), norm="group", randomise=True, **kwargs) -> UNet:
    """A small text U-Net; with ``randomise`` every weight random (no zero branch hides text)."""
    torch.manual_seed(1)
    net = UNet(1, (8, 16), num_res_blocks=1, time_embed_dim=16, attention_levels=attention_levels,
               num_heads=2, norm=norm, norm_groups=4, text_dim=WIDTH, **kwargs)  # fmt: skip
    if randomise:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.3)
    return net.eval()


def condition(b: int, length: int, seed: int) -> TextCondition:
    return random_text_condition(b, length, WIDTH, seed)


def test_padding_tokens_never_change_a_text_unets_output():
    net = text_unet()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), condition(4, 5, 0)
    out = net(x, t, y)
    # Longer padding holding garbage: masked keys are never read.
    torch.testing.assert_close(net(x, t, pad_with_garbage(y)), out, atol=1e-5, rtol=1e-5)
    # ... while the tokens (cross-attention) and the pooled vector (embedding) do change it.
    other = condition(4, 5, 1)
    assert (net(x, t, TextCondition(other.tokens, other.mask, y.pooled)) - out).abs().max() > 1e-2
    assert (net(x, t, TextCondition(y.tokens, y.mask, other.pooled)) - out).abs().max() > 1e-2


def test_samples_of_a_batch_stay_independent_and_none_is_the_null_caption():
    net = text_unet()
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), condition(5, 6, 2)
    batch = net(x, t, y)
    for i in range(5):
        torch.testing.assert_close(batch[i : i + 1], net(x[i : i + 1], t[i : i + 1], y[i]),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    null = y.null_like()
    torch.testing.assert_close(net(x, t, None), net(x, t, null), atol=1e-6, rtol=1e-6)
    assert (net(x, t, null) - batch).abs().max() > 1e-2
    # A null caption beside real ones reads the learned null embedding, as alone.
    mixed = TextCondition.cat([y[:2], null[:1]])
    torch.testing.assert_close(net(x[:3], t[:3], mixed)[2], net(x[2:3], t[2:3], None)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_without_attention_levels_a_text_unet_reads_the_pooled_text_alone():
    net = text_unet(attention_levels=())
    assert net.text_embed.tokens is None and not any(s.cross for s in [*net.encoder, net.midcoder])
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), condition(3, 4, 4)
    other = condition(3, 4, 5)
    swapped = TextCondition(other.tokens, other.mask, y.pooled)
    torch.testing.assert_close(net(x, t, swapped), net(x, t, y))
    assert (net(x, t, other) - net(x, t, y)).abs().max() > 1e-2


@pytest.mark.parametrize("levels", [(0, 1), ()])
def test_a_text_unet_starts_at_zero_and_trains_every_parameter(levels):
    net = text_unet(levels, randomise=False).train()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), condition(3, 4, 3)
    assert net(x, t, y).abs().max() == 0  # zero_init: every branch and the output start at 0
    assert all(s.cross.attn.out.weight.abs().max() == 0 for s in net.encoder if s.cross)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net(x, t, y).square().sum().backward()
    unused = [name for name, p in net.named_parameters() if p.grad is None]
    assert unused == []  # DDP needs no find_unused_parameters


def softmax_attention(q, k, v, heads, mask=None):
    """softmax(q k^T / sqrt(d) + log mask) v per head, written out in float64."""
    b, n, width = q.shape
    d = width // heads
    q, k, v = (a.double().view(b, -1, heads, d).transpose(1, 2) for a in (q, k, v))
    scores = q @ k.transpose(-1, -2) / d**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)


def test_the_unets_attention_blocks_are_softmax_attention_written_out():
    torch.manual_seed(0)
    block = SelfAttention(8, 2, "group", 4)
    h = torch.randn(2, 8, 3, 5)
    tokens = block.norm(h).flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    a = block.out(softmax_attention(q, k, v, 2).float())
    expected = h + a.transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(h), expected, atol=1e-5, rtol=1e-5)

    cross = CrossAttention(8, 2, text_width=WIDTH)
    text, mask = torch.randn(2, 4, WIDTH), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    k, v = cross.kv(text).chunk(2, dim=-1)
    expected = cross.out(softmax_attention(cross.q(tokens), k, v, 2, mask).float())
    torch.testing.assert_close(cross(tokens, text, mask), expected, atol=1e-5, rtol=1e-5)


def test_a_unet_reads_labels_or_text_not_both():
    with pytest.raises(UsageError, match="labels or on text"):
        UNet(1, (8, 16), norm_groups=4, num_classes=3, text_dim=8)
    with pytest.raises(UsageError, match="text_dim must be >= 0"):
        UNet(1, (8, 16), norm_groups=4, text_dim=-1)
