"""Text conditioning: encoders (strings -> token embeddings, mask, pooled vector), the word
tokenizer of the default encoder, and the condition networks read."""

from flowdiff.text.condition import TextCondition
from flowdiff.text.encoders import TextEncoder, TrainedTextEncoder, check_text_network
from flowdiff.text.tokenizer import WordTokenizer

__all__ = [
    "TextCondition",
    "TextEncoder",
    "TrainedTextEncoder",
    "WordTokenizer",
    "check_text_network",
]
