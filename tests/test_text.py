"""Text conditioning: the word tokenizer, the trained encoder, the null caption, caption dropout,
networks that read text (padding masked, samples independent), guidance with the exact field."""

import math

import pytest
import torch

from flowdiff.data.labels import NULL_CAPTION, LabelDropout
from flowdiff.fields import ModelField
from flowdiff.nets.dit import DiT
from flowdiff.paths import GaussianConditionalPath
from flowdiff.samplers import EulerSampler
from flowdiff.testing import GaussianMixtureField, pad_with_garbage, random_text_condition
from flowdiff.text import TextCondition, TextEncoder, TrainedTextEncoder, WordTokenizer
from flowdiff.utils import UsageError

CAPTIONS = ["a red circle at the top", "a blue square at the bottom", "A red square, small"]


def test_the_tokenizer_is_built_from_the_captions_most_frequent_words_first():
    tok = WordTokenizer.from_captions(CAPTIONS, max_length=4)
    # "a" 3x; "at", "red", "square", "the" 2x (alphabetical); then the rest once.
    assert tok.vocabulary[:5] == ["a", "at", "red", "square", "the"]
    assert set(tok.vocabulary) == {w for c in CAPTIONS for w in c.lower().replace(",", "").split()}
    ids, mask = tok(["A red thing", "", "a b c d e f"])
    assert ids.shape == (3, 4)  # the longest kept caption: 4 words, cut at max_length
    assert ids[0].tolist() == [2, 4, 1, 0]  # a, red, unknown, padding
    assert not mask[1].any() and mask.sum(1).tolist() == [3, 0, 4]
    assert tok.unknown_words(["a green thing", "green"]) == ["green", "thing"]
    assert tok.long_texts(["a b c d e", "a b"]) == ["a b c d e"]


def tiny_encoder(**kwargs) -> TrainedTextEncoder:
    torch.manual_seed(0)
    vocabulary = WordTokenizer.from_captions(CAPTIONS).vocabulary
    return TrainedTextEncoder(vocabulary, **{"dim": 16, "depth": 2, "num_heads": 2, **kwargs})


def test_the_trained_encoder_masks_padding_and_gives_the_null_caption_no_token():
    encoder = tiny_encoder().eval()
    alone = encoder(["a red circle"])
    batch = encoder(["a red circle", NULL_CAPTION, "a blue square at the bottom"])
    assert batch.tokens.shape == (3, 6, 16) and batch.pooled.shape == (3, 16)
    assert batch.mask[0].tolist() == [True] * 3 + [False] * 3
    # Padding changes nothing: the caption encoded alone and beside a longer one agree.
    torch.testing.assert_close(batch.tokens[0, :3], alone.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)
    assert batch.is_null.tolist() == [False, True, False]
    assert batch.tokens[1].abs().sum() == 0 and batch.pooled[1].abs().sum() == 0
    # Padded positions are zero and the pooled vector is the mean of the real tokens.
    assert batch.tokens[0, 3:].abs().sum() == 0
    torch.testing.assert_close(batch.pooled[0], batch.tokens[0, :3].mean(0))
    nothing = encoder([NULL_CAPTION, "  "])
    assert nothing.is_null.all() and nothing.pooled.abs().sum() == 0


def test_the_trained_encoder_needs_a_vocabulary_and_says_what_prompts_it_cannot_read():
    with pytest.raises(UsageError, match="needs a vocabulary"):
        TrainedTextEncoder(None)
    encoder = tiny_encoder(max_length=4)
    warnings = encoder.prompt_warnings(["a green circle", "a red circle at the top"])
    assert any("never saw" in w and "green" in w for w in warnings)
    assert any("cut to the encoder's 4 words" in w for w in warnings)
    assert encoder.prompt_warnings(["a red circle"]) == []


def test_caption_dropout_replaces_captions_by_the_null_caption_with_probability_p_uncond():
    captions = [f"caption {i}" for i in range(20_000)]
    assert LabelDropout(0.0, 0)(captions) is captions
    assert LabelDropout(1.0, 0)(captions[:10]) == [NULL_CAPTION] * 10
    out = LabelDropout(0.1, 0)(captions, torch.Generator().manual_seed(0))
    dropped = sum(c == NULL_CAPTION for c in out) / len(captions)
    assert abs(dropped - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(captions))
    assert all(c in (NULL_CAPTION, f"caption {i}") for i, c in enumerate(out))


def text_dit(mode: str) -> DiT:
    """A small text DiT with every weight random (no zero-initialised branch hides the text)."""
    torch.manual_seed(1)
    net = DiT(1, 8, patch_size=4, hidden=16, depth=2, num_heads=2, text_dim=16, text_mode=mode)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


def condition(b: int, length: int, seed: int) -> TextCondition:
    return random_text_condition(b, length, 16, seed)


MODES = ["pooled", "cross", "joint"]


@pytest.mark.parametrize("mode", MODES)
def test_padding_tokens_never_change_a_text_networks_output(mode):
    net = text_dit(mode)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), condition(4, 5, 0)
    out = net(x, t, y)
    # Longer padding holding garbage: masked keys are never read.
    torch.testing.assert_close(net(x, t, pad_with_garbage(y)), out, atol=1e-5, rtol=1e-5)
    # ... while the real tokens and the pooled vector do change it (the test can fail).
    other = condition(4, 5, 1)
    assert (net(x, t, other) - out).abs().max() > 1e-2
    if mode != "pooled":
        swapped = TextCondition(other.tokens, other.mask, y.pooled)
        assert (net(x, t, swapped) - out).abs().max() > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_samples_of_a_batch_stay_independent_and_none_is_the_null_caption(mode):
    net = text_dit(mode)
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), condition(5, 6, 2)
    batch = net(x, t, y)
    for i in range(5):
        alone = net(x[i : i + 1], t[i : i + 1], y[i])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    null = y.null_like()
    torch.testing.assert_close(net(x, t, None), net(x, t, null), atol=1e-6, rtol=1e-6)
    assert (net(x, t, null) - batch).abs().max() > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_a_text_dit_starts_at_zero_and_trains_every_parameter(mode):
    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=4, hidden=16, depth=2, num_heads=2, text_dim=16, text_mode=mode)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), condition(3, 4, 3)
    assert net(x, t, y).abs().max() == 0  # adaLN-Zero: every block starts as the identity
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net(x, t, y).square().sum().backward()
    unused = [name for name, p in net.named_parameters() if p.grad is None]
    assert unused == []  # DDP needs no find_unused_parameters


def test_a_network_reads_labels_or_text_not_both_and_names_bad_text_modes():
    with pytest.raises(UsageError, match="labels or on text"):
        DiT(1, 8, patch_size=4, hidden=16, num_classes=3, text_dim=8)
    with pytest.raises(UsageError, match="unknown text_mode"):
        DiT(1, 8, patch_size=4, hidden=16, text_dim=8, text_mode="concat")


class SideEncoder(TextEncoder):
    """Captions "left" and "right" as one-hot pooled vectors (one token each)."""

    dim, max_length = 2, 1

    def encode(self, texts):
        pooled = torch.tensor([[1.0, 0.0] if t == "left" else [0.0, 1.0] for t in texts])
        return TextCondition(pooled[:, None].double(), torch.ones(len(texts), 1, dtype=bool),
                             pooled.double())  # fmt: skip


class ExactTextNet(torch.nn.Module):
    """The exact velocity of mixture component k for caption k, of the mixture for the null one."""

    num_classes, text_dim = 0, 2

    def __init__(self, exact: GaussianMixtureField):
        super().__init__()
        self.exact = exact

    def forward(self, x, t, y=None):
        mixture = self.exact.velocity(x, t)
        if y is None:
            return mixture
        parts = [self.exact.component(k).velocity(x, t) for k in range(2)]
        k = y.pooled.argmax(1)[:, None]
        own = torch.where(k == 0, parts[0], parts[1])
        return torch.where(y.is_null[:, None], mixture, own)


def test_guidance_zero_is_the_unconditional_field_and_one_the_prompts_own():
    """The exact field of a two-component mixture: w = 0 is the mixture (the null caption's
    field), w = 1 samples the prompt's component, any w is (1 - w) u(x|null) + w u(x|prompt)."""
    path = GaussianConditionalPath("linear", t_min=0.0, t_max=1.0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    exact = GaussianMixtureField(path, [0.3, 0.7], means, [0.5, 0.5])
    net, encoder = ExactTextNet(exact), SideEncoder()
    n = 4000
    y = encoder(["left"] * n)
    x_0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = EulerSampler(200).sample(ModelField(net, path, "velocity", y, 1.0, 0), x_0).x
    assert (one.mean(0) - means[0]).abs().max() < 4 * 0.5 / math.sqrt(n) + 0.02
    zero = EulerSampler(200).sample(ModelField(net, path, "velocity", y, 0.0, 0), x_0).x
    assert abs((zero[:, 0] > 0).double().mean().item() - 0.7) < 4 * math.sqrt(0.21 / n)
    x, t = x_0[:8], torch.full((8,), 0.4, dtype=torch.float64)
    guided = ModelField(net, path, "velocity", y[:8], 3.0, 0).velocity(x, t)
    u_k, u_null = exact.component(0).velocity(x, t), exact.velocity(x, t)
    torch.testing.assert_close(guided, u_null + 3.0 * (u_k - u_null), rtol=1e-12, atol=1e-12)


class NullReader(torch.nn.Module):
    """Outputs 1 for the null caption and 2 for any other: which branch a target used."""

    num_classes, text_dim, interval = 0, 2, True

    def forward(self, x, t, y=None, r=None):
        null = torch.ones(len(x), dtype=torch.bool) if y is None else y.is_null
        return torch.where(null[:, None], 1.0, 2.0).expand_as(x)


def test_meanflow_training_guidance_mixes_in_the_null_caption_for_captioned_samples_only():
    from flowdiff.meanflow import MeanFlow

    path = GaussianConditionalPath("linear")
    z, eps, t = torch.zeros(4, 2), torch.zeros(4, 2), torch.full((4,), 0.5)
    sample = path.sample(z, t, eps)  # velocity target d_alpha z + d_beta eps = 0
    y = SideEncoder()(["left", "", "right", ""])
    objective = MeanFlow(guidance=3.0)
    objective.check(NullReader(), path)
    v = objective.velocity(NullReader(), sample, path, y)
    # Captioned rows: w v + (1 - w) v_null = 3 * 0 + (1 - 3) * 1 = -2; null rows keep v = 0.
    assert v[:, 0].tolist() == [-2.0, 0.0, -2.0, 0.0]


def test_the_stable_target_refuses_a_network_that_reads_captions():
    from flowdiff.objectives import StableTargetFlowMatching

    net = DiT(1, 8, patch_size=4, hidden=16, depth=1, num_heads=2, text_dim=8)
    with pytest.raises(UsageError, match="ConditionalFlowMatching"):
        StableTargetFlowMatching().check(net, GaussianConditionalPath("linear"))
