"""Text encoders: a list of strings in; token embeddings, their mask and a pooled vector out.

- :class:`TextEncoder` is the contract (and the handling of the null caption ``""``, the same
  for every encoder).
- :class:`TrainedTextEncoder`, the default, is a small transformer trained jointly with the flow
  model on a word vocabulary built from the training captions: it works offline and its
  checkpoint holds everything (the vocabulary is a plain list of words in its config).
"""

from __future__ import annotations

import inspect
import itertools

import torch
from torch import nn

from flowdiff.config import Recorded
from flowdiff.text.condition import TextCondition
from flowdiff.text.tokenizer import WordTokenizer
from flowdiff.utils import UsageError


class TextEncoder(nn.Module):
    """``encoder(texts) -> TextCondition`` (tokens (b, l, dim), mask (b, l), pooled (b, dim)).

    Subclasses set ``dim`` and ``max_length`` and implement :meth:`encode` for captions that are
    not empty; ``forward`` gives the empty caption ``""`` (the null caption of guidance) no token
    and a zero pooled vector, whatever the encoder. ``trainable`` says whether the flow model's
    optimizer trains it. :meth:`prepare` sees the training captions before training (a frozen
    encoder computes its cache there); :meth:`prompt_warnings` says what is wrong with prompts.
    """

    dim: int
    max_length: int
    trainable: bool = True

    def encode(self, texts: list[str]) -> TextCondition:
        raise NotImplementedError

    @classmethod
    def width(cls, init_args: dict) -> int:
        """The width ``dim`` an encoder built with ``init_args`` gives, known before it is built
        (the CLI gives the network's ``text_dim`` from it). Default: the ``dim`` argument."""
        dim = init_args.get("dim")
        return int(
            dim if dim is not None else inspect.signature(cls.__init__).parameters["dim"].default
        )

    @classmethod
    def from_data(cls, init_args: dict, captions: list[str]) -> None:
        """Fill in place what the training ``captions`` fix of ``init_args`` (nothing by
        default; the trained encoder's vocabulary)."""

    def prepare(self, captions: list[str]) -> None:
        """Called with the data's training captions before training (nothing by default)."""

    def prompt_warnings(self, texts: list[str]) -> list[str]:
        """One line for each problem of ``texts`` as prompts (too long, unknown words); a
        UsageError for prompts the encoder cannot encode at all (said before sampling starts)."""
        return []

    def forward(self, texts: list[str]) -> TextCondition:
        texts = list(texts)
        real = [i for i, text in enumerate(texts) if text.strip()]
        if len(real) == len(texts):
            return self.encode(texts)
        # An encoder without parameters (a frozen one) keeps a buffer on its device.
        device = next(itertools.chain(self.parameters(), self.buffers()), torch.empty(0)).device
        if not real:
            empty = torch.zeros(len(texts), 1, self.dim, device=device)
            mask = torch.zeros(len(texts), 1, dtype=torch.bool, device=device)
            return TextCondition(empty, mask, empty[:, 0])
        some = self.encode([texts[i] for i in real])
        index = torch.tensor(real, device=some.tokens.device)
        rows = len(texts)
        tokens = some.tokens.new_zeros(rows, *some.tokens.shape[1:]).index_copy(
            0, index, some.tokens
        )
        mask = some.mask.new_zeros(rows, some.mask.shape[1]).index_copy(0, index, some.mask)
        pooled = some.pooled.new_zeros(rows, some.pooled.shape[1]).index_copy(0, index, some.pooled)
        return TextCondition(tokens, mask, pooled)


class TrainedTextEncoder(Recorded, TextEncoder):
    """Word embeddings, learned positions and ``depth`` pre-norm transformer layers over each
    caption (padding masked); pooled: the mean of the caption's tokens.

    Args:
        vocabulary: the known words in id order. None under the CLI: built from the data's
            training captions (:meth:`WordTokenizer.from_captions`) and recorded in the config,
            so the checkpoint rebuilds the same tokenizer. In plain Python pass
            ``WordTokenizer.from_captions(captions).vocabulary``.
        dim: width of the token embeddings.
        depth: transformer layers (0: word and position embeddings only).
        num_heads: attention heads; they divide ``dim``.
        max_length: the most words a caption keeps; longer prompts are cut, with a warning.
    """

    def __init__(
        self,
        vocabulary: list[str] | None = None,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        max_length: int = 32,
    ):
        super().__init__()
        if vocabulary is None:
            raise UsageError(
                "TrainedTextEncoder needs a vocabulary: flowdiff fit builds it from the data's "
                "captions; in Python pass WordTokenizer.from_captions(captions).vocabulary"
            )
        if dim < 1 or depth < 0 or num_heads < 1 or dim % num_heads or max_length < 1:
            raise UsageError(
                f"text encoder: dim ({dim}) must be a positive multiple of num_heads "
                f"({num_heads}), depth >= 0 ({depth}), max_length >= 1 ({max_length})"
            )
        self.tokenizer = WordTokenizer(vocabulary, max_length)
        self.dim, self.max_length = dim, max_length
        self.embed = nn.Embedding(self.tokenizer.size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_data(cls, init_args: dict, captions: list[str]) -> None:
        if init_args.get("vocabulary") is None:
            init_args["vocabulary"] = WordTokenizer.from_captions(captions).vocabulary

    def encode(self, texts: list[str]) -> TextCondition:
        """texts: b non-empty captions. tokens (b, l, dim), mask (b, l), pooled (b, dim)."""
        device = self.position.device
        ids, mask = (a.to(device) for a in self.tokenizer(texts))
        # A caption of unknown words only still has tokens (id 1); none is all padding here.
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        h = h * mask[..., None]
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextCondition(h, mask, pooled)

    def prompt_warnings(self, texts: list[str]) -> list[str]:
        out = []
        unknown = self.tokenizer.unknown_words(texts)
        if unknown:
            out.append(
                f"words the text encoder never saw in training (read as unknown): "
                f"{', '.join(unknown)}"
            )
        for text in self.tokenizer.long_texts(texts):
            out.append(f"prompt cut to the encoder's {self.max_length} words: {text!r}")
        return out


def check_text_network(net: nn.Module, text_encoder: TextEncoder | None) -> None:
    """A network reads text exactly when there is a text encoder, of the encoder's width."""
    text_dim = int(getattr(net, "text_dim", 0) or 0)
    if text_encoder is None and text_dim:
        raise UsageError(
            f"the network reads text (text_dim {text_dim}) but the model has no text encoder; "
            "set model.text_encoder (captioned data gets flowdiff.text.TrainedTextEncoder)"
        )
    if text_encoder is not None and text_dim != text_encoder.dim:
        what = "reads no text" if not text_dim else f"reads text of width {text_dim}"
        raise UsageError(
            f"the network {what} but the text encoder gives width {text_encoder.dim}; set "
            f"model.net.init_args.text_dim {text_encoder.dim} (a network that takes text_dim)"
        )
