"""Text embeddings computed by the user, given as a file: an encoder that looks texts up.

The file is the format of :mod:`flowdiff.text.cache`: a ``.pt`` dict with ``text`` (N strings),
``tokens`` (N, L, D), ``mask`` (N, L) and ``pooled`` (N, D), or a cache directory. It may be
the data file itself: a :class:`flowdiff.data.pairs.TensorPairsDataModule` file holding ``x``,
``text`` and the three embeddings trains with this encoder and no other setting (the CLI picks
it). Embeddings reach the network only through a text encoder, whatever computed them.
"""

from __future__ import annotations

import torch

from flowdiff.config import Recorded
from flowdiff.text.cache import EmbeddingTable, Shared
from flowdiff.text.condition import TextCondition
from flowdiff.text.encoders import TextEncoder
from flowdiff.utils import UsageError


def load_table(path: str | None) -> EmbeddingTable:
    if path is None:
        raise UsageError(
            "PrecomputedTextEncoder needs a path: --model.text_encoder.init_args.path FILE (a .pt "
            "with text, tokens, mask, pooled)"
        )
    from pathlib import Path

    where = f"model.text_encoder.init_args.path {path!r}"
    if not Path(path).exists():
        raise UsageError(f"{where}: no such file")
    return EmbeddingTable.load(path, where)


class PrecomputedTextEncoder(Recorded, TextEncoder):
    """Embeddings read from ``path`` (memory-mapped), looked up by their text; frozen.

    It encodes the texts the file holds, and those only: a prompt that is not in it is a
    UsageError (add its embeddings to the file, computed with the same encoder). ``dim`` is the
    file's D, ``max_length`` its L.

    Args:
        path: the ``.pt`` file (or cache directory); the checkpoint records this path.
    """

    trainable = False

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self.shared = Shared(table=load_table(path))  # memory-mapped, shared by copies
        self.dim, self.max_length = self.table.dim, self.table.length
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # the module's device

    @property
    def table(self) -> EmbeddingTable:
        if self.shared.table is None:  # unpickled
            self.shared.table = load_table(self.path)
        return self.shared.table

    @classmethod
    def width(cls, init_args: dict) -> int:
        return load_table(init_args.get("path")).dim

    @classmethod
    def from_data(cls, init_args: dict, captions: list[str]) -> None:
        """Refuse a file that lacks training captions, before anything is built."""
        table = load_table(init_args.get("path"))
        missing = table.missing([c for c in captions if c.strip()])
        if missing:
            raise UsageError(
                f"{table.where}: {len(missing)} training captions have no embeddings in it "
                f"(e.g. {missing[0]!r})"
            )

    def encode(self, texts: list[str]) -> TextCondition:
        self.check(texts)
        return self.table.lookup(texts).to(self.anchor.device)

    def check(self, texts: list[str]) -> None:
        """A UsageError naming the texts the file does not hold."""
        missing = self.table.missing(texts)
        if missing:
            raise UsageError(
                f"no precomputed embeddings for {missing[0]!r} in {self.path!r}"
                + (f" (and {len(missing) - 1} more texts)" if len(missing) > 1 else "")
                + ": a PrecomputedTextEncoder only encodes the texts its file holds; add theirs"
            )

    def prompt_warnings(self, texts: list[str]) -> list[str]:
        """None; a prompt the file does not hold is a UsageError, before sampling."""
        self.check([t for t in texts if t.strip()])
        return []
