"""Text conditioning: encoders (strings -> token embeddings, mask, pooled vector), the word
tokenizer of the default encoder, and the condition networks read.

- :class:`TrainedTextEncoder` (the default): trained with the flow model, offline.
- :class:`PretrainedTextEncoder`: a frozen CLIP text model or T5 encoder (``transformers``,
  ``pip install 'flowdiff[text]'``), its embeddings cached on disk once per dataset.
- :class:`PrecomputedTextEncoder`: embeddings the user computed, read from a file.
"""

from flowdiff.text.condition import TextCondition
from flowdiff.text.encoders import TextEncoder, TrainedTextEncoder, check_text_network
from flowdiff.text.precomputed import PrecomputedTextEncoder
from flowdiff.text.pretrained import PretrainedTextEncoder
from flowdiff.text.tokenizer import WordTokenizer

__all__ = [
    "PrecomputedTextEncoder", "PretrainedTextEncoder", "TextCondition", "TextEncoder",
    "TrainedTextEncoder", "WordTokenizer", "check_text_network",
]  # fmt: skip
