"""A word tokenizer built from the training captions, stored in the checkpoint as plain data."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor

WORD = re.compile(r"[a-z0-9]+")
PAD, UNKNOWN = 0, 1  # ids 2.. are the vocabulary's words, in its order


def words(text: str) -> list[str]:
    """The lower-cased runs of letters and digits of ``text``: ``"A red, big circle"`` ->
    ``["a", "red", "big", "circle"]``."""
    return WORD.findall(text.lower())


class WordTokenizer:
    """Captions -> word ids (0: padding, 1: a word not in the vocabulary, 2..: the words).

    Args:
        vocabulary: the known words, in id order (``from_captions`` builds it).
        max_length: the most tokens a caption keeps; longer ones are cut (``long_texts`` says
            which).
    """

    def __init__(self, vocabulary: list[str], max_length: int = 32):
        self.vocabulary, self.max_length = list(vocabulary), max_length
        self.ids = {word: i + 2 for i, word in enumerate(self.vocabulary)}

    @classmethod
    def from_captions(cls, captions: Iterable[str], max_length: int = 32) -> WordTokenizer:
        """Every word of ``captions``, the most frequent first (ties alphabetically)."""
        counts = Counter(word for caption in captions for word in words(caption))
        vocabulary = sorted(counts, key=lambda word: (-counts[word], word))
        return cls(vocabulary, max_length)

    @property
    def size(self) -> int:
        """Number of ids, padding and unknown included."""
        return len(self.vocabulary) + 2

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(ids, mask)``: (b, l) long and bool, l the longest caption's length (at least 1,
        at most ``max_length``). The empty caption has no token (its mask row is all False)."""
        rows = [
            [self.ids.get(w, UNKNOWN) for w in words(text)][: self.max_length] for text in texts
        ]
        length = max([len(row) for row in rows] + [1])
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD

    def unknown_words(self, texts: list[str]) -> list[str]:
        """The words of ``texts`` that the vocabulary lacks, each once, in order of appearance."""
        seen = dict.fromkeys(w for text in texts for w in words(text) if w not in self.ids)
        return list(seen)

    def long_texts(self, texts: list[str]) -> list[str]:
        """The texts with more than ``max_length`` words."""
        return [text for text in texts if len(words(text)) > self.max_length]
