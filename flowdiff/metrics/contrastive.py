"""A small image-text contrastive model (CLIP's objective) trained once on a captioned dataset's own
training split, and cached: the embedding space of R-precision (:mod:`flowdiff.metrics.text`).

- **architecture** :class:`ContrastiveModel`: images through :class:`ImageClassifier`'s CNN
  (its 128-wide ``features``, then a linear map to ``dim``), captions through a
  :class:`~flowdiff.text.TrainedTextEncoder` on the captions' own word vocabulary (its pooled
  vector, then a linear map to ``dim``); both L2-normalised.
- **training** :data:`TRAINING`: the symmetric InfoNCE loss of CLIP (Radford et al., 2021) over
  in-batch pairs, a learned temperature, one of each image's captions drawn every step; seeded
  order, caption choice and initialisation, so the same data gives the same network.
- **cache** ``<cache_dir>/contrastive-<sha1(protocol)[:12]>.pt``, the protocol being the
  architecture, the recipe and the SHA-1 of the images and captions; written atomically, read
  with ``weights_only=True``; an unreadable file is trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiff.metrics.classifier import ImageClassifier, _digest
from flowdiff.metrics.images import quantize
from flowdiff.metrics.model_cache import cache_path, check_writable, read_cached
from flowdiff.metrics.pixels import pixels_to_float
from flowdiff.utils import UsageError, atomic_path

CONTRASTIVE_VERSION = 1
TRAINING = {"seed": 0, "steps": 800, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4,
            "dim": 64, "text_dim": 64}  # fmt: skip


class ContrastiveModel(nn.Module):
    """``image_embedding(x)`` (N, dim) and ``text_embedding(texts)`` (M, dim), unit vectors;
    ``features(x)`` (N, 128): the image tower's features (a feature network for the FD)."""

    def __init__(self, data_shape, vocabulary: list[str], dim: int = 64, text_dim: int = 64):
        super().__init__()
        from flowdiff.text import TrainedTextEncoder

        channels, height, width = data_shape
        self.image = ImageClassifier(channels, (height, width), dim)  # its head maps to dim
        self.text = TrainedTextEncoder(vocabulary, text_dim, depth=1, num_heads=4, max_length=32)
        self.text_head = nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial 1/T

    def features(self, x: Tensor) -> Tensor:
        return self.image.features(x)

    def image_embedding(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def text_embedding(self, texts: list[str]) -> Tensor:
        return F.normalize(self.text_head(self.text(list(texts)).pooled), dim=-1)

    def loss(self, x: Tensor, texts: list[str]) -> Tensor:
        """Symmetric InfoNCE: logits s * <f(x_i), g(c_j)> (b, b), the pairs on the diagonal."""
        scale = self.log_scale.clamp(max=math.log(100)).exp()
        logits = scale * self.image_embedding(x) @ self.text_embedding(texts).T
        target = torch.arange(len(x), device=x.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def protocol_of(images: Tensor, captions: list[list[str]], data_shape) -> dict:
    from flowdiff.text.tokenizer import WordTokenizer

    vocabulary = WordTokenizer.from_captions(c for options in captions for c in options).vocabulary
    model = ContrastiveModel(data_shape, vocabulary, TRAINING["dim"], TRAINING["text_dim"])
    text = hashlib.sha1(json.dumps(captions).encode()).hexdigest()
    return {
        "version": CONTRASTIVE_VERSION,
        "architecture": repr(model),
        "training": TRAINING,
        "images": _digest(images),
        "captions": text,
        "vocabulary": vocabulary,
    }


def train_contrastive(
    images: Tensor, captions: list[list[str]], protocol: dict, data_shape, log=print
) -> ContrastiveModel:
    """Train on uint8 ``images`` (N, C, H, W) and ``captions`` (N lists, at least one each)."""
    if len(images) < 2:
        raise UsageError("the contrastive model needs at least two captioned training images")
    seed, steps, batch = TRAINING["seed"], TRAINING["steps"], TRAINING["batch_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveModel(data_shape, protocol["vocabulary"], TRAINING["dim"],
                                 TRAINING["text_dim"])  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"],
                            weight_decay=TRAINING["weight_decay"])  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, TRAINING["lr"], total_steps=steps)
    model.train()
    order = torch.randperm(len(images), generator=g)
    at = 0
    for step in range(steps):
        if at + batch > len(order):
            order, at = torch.randperm(len(images), generator=g), 0
        rows = order[at : at + min(batch, len(order))]
        at += len(rows)
        picks = torch.randint(1 << 30, (len(rows),), generator=g)
        texts = [captions[r][p % len(captions[r])] for r, p in zip(rows.tolist(), picks.tolist(),
                                                                     strict=True)]  # fmt: skip
        loss = model.loss(pixels_to_float(images[rows]), texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % (steps // 4) == 0:
            log(f"contrastive model step {step + 1}/{steps}: loss {loss.item():.4f}")
    return model.eval()


def load_or_train_contrastive(
    images: Tensor,
    captions: list[list[str]],
    data_shape,
    cache_dir: str | Path,
    log: Callable[[str], None] = print,
) -> tuple[ContrastiveModel, Path, bool]:
    """The model of this data from the cache, or trained now and cached; with its path and
    whether it was trained now."""
    protocol = protocol_of(images, captions, data_shape)
    path = cache_path(cache_dir, protocol, "contrastive")

    def make() -> ContrastiveModel:
        return ContrastiveModel(
            data_shape, protocol["vocabulary"], TRAINING["dim"], TRAINING["text_dim"]
        )

    cached = read_cached(path, protocol, make, log, "contrastive cache")
    if cached is not None:
        return cached[0], path, False
    check_writable(path.parent, "cache")
    log(f"training the image-text contrastive model (once; cached as {path})")
    model = train_contrastive(images, captions, protocol, data_shape, log)
    with atomic_path(path) as tmp:
        torch.save({"protocol": protocol, "state_dict": model.state_dict()}, tmp)
    return model, path, True


@torch.no_grad()
def embed_images(model: ContrastiveModel, images: Tensor, batch_size: int = 500) -> Tensor:
    """Unit image embeddings (N, dim) of float images in [-1, 1], quantised as saved images."""
    model.eval()
    parts = [model.image_embedding(quantize(images[i : i + batch_size]))
             for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(parts)


@torch.no_grad()
def embed_texts(model: ContrastiveModel, texts: list[str], batch_size: int = 500) -> Tensor:
    model.eval()
    parts = [model.text_embedding(texts[i : i + batch_size])
             for i in range(0, len(texts), batch_size)]  # fmt: skip
    return torch.cat(parts)
