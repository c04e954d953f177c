"""What a text encoder gives a network: token embeddings, their mask and a pooled vector.

The null caption (classifier-free guidance's unconditional branch) is the empty string ``""``:
its condition has no token (``mask`` all False) and zeros for the pooled vector. Networks replace
it by a learned null embedding (:class:`flowdiff.nets.text.TextEmbedder`), as a learned null
label stands for "no class": one mechanism for every encoder, trained or frozen, whatever the
encoder would make of an empty string, and the guidance scale w = 0 gives exactly the branch
that caption dropout trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Encoded captions of a batch.

    Attributes:
        tokens: (b, l, d) token embeddings; rows past a caption's length are padding.
        mask: (b, l) bool, True for real tokens; a row with no True is the null caption.
        pooled: (b, d) one vector per caption (zeros for the null caption).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> TextCondition:
        """Rows ``index`` (a slice, an index tensor): the same captions, fewer of them."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index])

    @property
    def is_null(self) -> Tensor:
        """(b,) bool: which rows are the null caption."""
        return ~self.mask.any(dim=1)

    def null_like(self) -> TextCondition:
        """The null caption, as many rows as this batch."""
        return TextCondition(
            torch.zeros_like(self.tokens),
            torch.zeros_like(self.mask),
            torch.zeros_like(self.pooled),
        )

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextCondition:
        """On ``device``, the embeddings in ``dtype`` (the mask stays bool)."""
        return TextCondition(
            self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype)
        )

    def repeat_interleave(self, repeats: int) -> TextCondition:
        """Each caption ``repeats`` times in a row (n samples per prompt)."""
        return TextCondition(
            self.tokens.repeat_interleave(repeats, 0),
            self.mask.repeat_interleave(repeats, 0),
            self.pooled.repeat_interleave(repeats, 0),
        )

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        """The batches one after the other, padded to the longest token count."""
        length = max(p.tokens.shape[1] for p in parts)
        return TextCondition(
            torch.cat([_pad(p.tokens, length) for p in parts]),
            torch.cat([_pad(p.mask, length) for p in parts]),
            torch.cat([p.pooled for p in parts]),
        )


def _pad(x: Tensor, length: int) -> Tensor:
    """``x`` (b, l, ...) padded with zeros (False) to (b, length, ...)."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)
