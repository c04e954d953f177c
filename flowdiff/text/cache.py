"""Text embeddings on disk: the cache a frozen encoder fills once per dataset, and the format of
embeddings precomputed by the user (one format for both).

An :class:`EmbeddingTable` holds the embeddings of N texts: row i of ``tokens`` (N, L, D),
``mask`` (N, L) bool and ``pooled`` (N, D) encodes ``text[i]`` (rows past a text's length are
padding, mask False). It is stored either as

- a ``.pt`` file, a dict ``{"text": [...], "tokens": ..., "mask": ..., "pooled": ...}`` (what a
  user writes with ``torch.save``; read with ``torch.load(mmap=True, weights_only=True)``), or
- a directory ``text.json``, ``tokens.npy``, ``mask.npy``, ``pooled.npy`` (what the cache
  writes: the arrays are filled batch by batch through ``numpy.lib.format.open_memmap``, so a
  dataset larger than memory is encoded in constant memory; read with ``mmap_mode="r"``).

Either way the arrays are memory-mapped: a batch reads only its rows from the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowdiff.text.condition import TextCondition
from flowdiff.utils import UsageError, default_cache

FORMAT = 1  # bump when what a cache entry holds changes: older entries are then not read
KEYS = ("tokens", "mask", "pooled")
HASHED_WHOLE = 32 * 2**20  # files up to 32 MiB are hashed whole; larger ones by size and ends
HASHED_END = 4 * 2**20


class EmbeddingTable:
    """Row i of ``tokens`` (N, L, D), ``mask`` (N, L) and ``pooled`` (N, D) encodes ``text[i]``;
    :meth:`lookup` gives the rows of given texts as a :class:`TextCondition`."""

    def __init__(self, text: list[str], tokens: Tensor, mask: Tensor, pooled: Tensor, where: str):
        n = len(text)
        if tokens.dim() != 3 or mask.shape != tokens.shape[:2] or pooled.dim() != 2:
            raise UsageError(
                f"{where}: expected tokens (N, L, D), mask (N, L), pooled (N, D); got tokens "
                f"{tuple(tokens.shape)}, mask {tuple(mask.shape)}, pooled {tuple(pooled.shape)}"
            )
        if not (len(tokens) == len(pooled) == n) or pooled.shape[1] != tokens.shape[2]:
            raise UsageError(
                f"{where}: {n} texts but tokens {tuple(tokens.shape)} and pooled "
                f"{tuple(pooled.shape)} (one row per text, the same width D)"
            )
        if not tokens.is_floating_point() or not pooled.is_floating_point():
            raise UsageError(f"{where}: tokens and pooled must be float, got {tokens.dtype}")
        self.text, self.where = list(text), where
        self.tokens, self.mask, self.pooled = tokens, mask, pooled
        self.rows = {t: i for i, t in reversed(list(enumerate(self.text)))}  # first occurrence

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[2])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def missing(self, texts: list[str]) -> list[str]:
        """The texts the table does not hold, each once, in order."""
        return list(dict.fromkeys(t for t in texts if t not in self.rows))

    def lookup(self, texts: list[str]) -> TextCondition:
        """The rows of ``texts`` (each in the table): tokens (b, l, D) float32, mask (b, l),
        pooled (b, D); l the longest of them (at least 1), not the table's L."""
        index = torch.tensor([self.rows[t] for t in texts], dtype=torch.long)
        mask = self.mask[index].bool()
        real = mask.any(0).nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        tokens = self.tokens[index, :length].float() * mask[:, :length, None]
        return TextCondition(tokens, mask[:, :length], self.pooled[index].float())

    @classmethod
    def load(cls, path: str | Path, where: str) -> EmbeddingTable:
        """A ``.pt`` file or a cache directory (see the module docstring), memory-mapped."""
        path = Path(path)
        try:
            if path.is_dir():
                text = json.loads((path / "text.json").read_text())
                with warnings.catch_warnings():  # the arrays are read-only, and so is the table
                    warnings.filterwarnings("ignore", message=".*not writable")
                    arrays = [
                        torch.from_numpy(np.load(path / f"{k}.npy", mmap_mode="r")) for k in KEYS
                    ]
            else:
                content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                missing = [k for k in ("text", *KEYS) if not isinstance(content, dict) or
                           k not in content]  # fmt: skip
                if missing:
                    found = sorted(content) if isinstance(content, dict) else type(content).__name__
                    raise UsageError(
                        f"{where}: holds no {', '.join(missing)} (found {found}); expected "
                        "text (N strings), tokens (N, L, D), mask (N, L), pooled (N, D)"
                    )
                text, arrays = content["text"], [content[k] for k in KEYS]
        except UsageError:
            raise
        except Exception as err:
            raise UsageError(f"{where}: cannot read it ({type(err).__name__}: {err})") from err
        if isinstance(text, str) or not all(isinstance(t, str) for t in text):
            raise UsageError(f"{where}: text must be a list of strings")
        if not all(isinstance(a, Tensor) for a in arrays):
            raise UsageError(f"{where}: tokens, mask and pooled must be tensors")
        return cls(list(text), *arrays, where=where)


class Shared:
    """What a frozen encoder holds outside the module tree (a Hugging Face model, its tokenizer,
    an embedding table): not in the flow model's ``state_dict``, and shared by its copies (the
    EMA's ``deepcopy``), all of it being read-only. Pickled, it is empty: it loads again."""

    def __init__(self, **values):
        self.model = self.tokenizer = self.table = self.key = None
        self.__dict__.update(values)

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (Shared, ())


def fingerprint(folder: Path) -> str:
    """sha256 over the files of ``folder`` (recursively, hidden ones skipped): each file's
    relative path, size and content, hashed whole up to 32 MiB and by its first and last 4 MiB
    beyond (weights files: their bytes change when the weights do; hashing gigabytes would take
    longer than the cache saves). Modification times are left out: a copied model keeps its
    cache."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= HASHED_WHOLE:
                digest.update(f.read())
            else:
                digest.update(f.read(HASHED_END))
                f.seek(size - HASHED_END)
                digest.update(f.read())
    return digest.hexdigest()


def cache_key(encoder: dict, captions: list[str]) -> str:
    """sha256 of the encoder's identity (``encoder``: plain data) and the set of ``captions``
    (order and repeats do not matter)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "encoder": encoder}, sort_keys=True)
                            .encode())  # fmt: skip
    for caption in sorted(set(captions)):
        digest.update(caption.encode() + b"\0")
    return digest.hexdigest()


def cache_dir(name: str, key: str) -> Path:
    """``<flowdiff cache>/text/<name>-<key>``: one directory per encoder and caption set (its
    ``info.json`` says which encoder)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "encoder"
    return default_cache() / "text" / f"{name}-{key[:24]}"


def write_table(folder: Path, text: list[str], length: int, dim: int, fill, info: dict) -> None:
    """Write a cache directory for ``text`` at once: ``fill(tokens, mask, pooled)`` writes the
    rows into the memory-mapped arrays (N, length, dim), (N, length), (N, dim). The directory is
    built under a temporary name and renamed: a killed run leaves no half entry (two processes
    writing the same entry: the first rename wins, the same content)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n = len(text)
        shapes = {"tokens": (n, length, dim), "mask": (n, length), "pooled": (n, dim)}
        dtypes = {"tokens": np.float32, "mask": np.bool_, "pooled": np.float32}
        arrays = {
            k: np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", dtypes[k], shapes[k]) for k in KEYS
        }
        fill(*(arrays[k] for k in KEYS))
        for array in arrays.values():
            array.flush()
        del arrays
        (tmp / "text.json").write_text(json.dumps(text))
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "text.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
