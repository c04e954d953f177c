"""flowdiff's own image classifiers: the feature networks of the image metrics.

Inception features were made for photographs; on MNIST a small classifier trained on the digits is
the feature space that means something (its penultimate layer separates the classes). flowdiff
trains it itself, deterministically, so every user gets the same network from the same data:

- **architecture** :class:`MNISTClassifier` (three conv blocks with batch norm, a 128-wide feature
  layer, a linear head), 28x28 inputs in [-1, 1]; 32x32 inputs (``pad_to_32``) are center-cropped.
- **training** :data:`TRAINING` on the official 60k training images, in an order drawn from
  a seeded generator, weights initialised from the same seed.
- **cache** ``<cache_dir>/mnist-classifier-<sha1(protocol)[:12]>.pt``, where the protocol is the
  architecture, the training recipe and the SHA-1 of the training and test data: change any of them
  and the name changes, so a stale network is never reused. Written atomically, read with
  ``weights_only=True``; an unreadable cache file is trained again.

Other labelled image data (an image folder, tensor files of images) gets the same treatment with
:class:`ImageClassifier`, sized by the data (any channels and size), trained by
:data:`IMAGE_TRAINING` on the data's own training split (:func:`image_recipe`), cached as
``image-classifier-<hash>.pt``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiff.metrics.model_cache import cache_path, check_writable, read_cached
from flowdiff.metrics.pixels import pixels_to_float
from flowdiff.utils import UsageError, atomic_path, default_cache  # noqa: F401 (re-exported)

# Bump when anything about the classifier changes that the protocol below does not capture.
CLASSIFIER_VERSION = 1
TRAINING = {"seed": 0, "epochs": 3, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4}
# Any labelled images: at least ``min_steps`` steps (a small dataset gets more epochs).
IMAGE_TRAINING = {**TRAINING, "min_steps": 600}
MIN_ACCURACY = 0.99  # below it, metrics in the classifier's features would mean little
IMAGE_MIN_ACCURACY = 0.9  # other data is often harder than digits; --min-accuracy sets it


class MNISTClassifier(nn.Module):
    """A small CNN: ``features`` (N, 128) and ``forward`` logits (N, 10) of images in [-1, 1]."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        self.body = nn.Sequential(
            *block(1, 32),
            nn.MaxPool2d(2),  # 14
            *block(32, 64),
            nn.MaxPool2d(2),  # 7
            *block(64, 128),
            nn.MaxPool2d(2),  # 3
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    @staticmethod
    def crop(x: Tensor) -> Tensor:
        """(N, 1, H, W) with H, W >= 28 to the central 28x28 (the padding of ``pad_to_32``)."""
        if x.dim() != 4 or x.shape[1] != 1 or min(x.shape[-2:]) < 28:
            raise ValueError(f"expected images (N, 1, >=28, >=28), got {tuple(x.shape)}")
        top, left = (x.shape[-2] - 28) // 2, (x.shape[-1] - 28) // 2
        return x[..., top : top + 28, left : left + 28].float()

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.crop(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ImageClassifier(nn.Module):
    """A small CNN for images (N, C, H, W) in [-1, 1] of any size: a conv block (batch norm,
    ReLU) then 2x max pooling a level until the maps are at most 4 pixels, global average pooling,
    ``features`` (N, 128) and a linear head to ``num_classes`` logits."""

    num_features = 128

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size, level = in_channels, min(image_size), 0
        while level == 0 or size > 4:
            c_out = min(32 * 2**level, 256)
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in, size, level = c_out, size // 2, level + 1
        self.body = nn.Sequential(
            *layers,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c_in, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class Recipe:
    """A feature classifier: its cache name, how to build it, how to train it, its floor."""

    name: str
    make: Callable[[], nn.Module]
    training: dict
    min_accuracy: float


def mnist_recipe() -> Recipe:
    return Recipe("mnist-classifier", MNISTClassifier, TRAINING, MIN_ACCURACY)


def image_recipe(data_shape, num_classes: int) -> Recipe:
    """The classifier of labelled images of shape (C, H, W) with ``num_classes`` classes."""
    channels, height, width = data_shape
    return Recipe(
        "image-classifier",
        lambda: ImageClassifier(channels, (height, width), num_classes),
        IMAGE_TRAINING,
        IMAGE_MIN_ACCURACY,
    )


@dataclass
class ClassifierInfo:
    path: Path
    test_accuracy: float
    trained: bool  # trained now (True) or loaded from the cache (False)
    protocol: dict


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def classifier_protocol(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], recipe: Recipe | None = None
) -> dict:
    """Everything the trained weights depend on: architecture, recipe, data."""
    recipe = recipe or mnist_recipe()
    return {
        "version": CLASSIFIER_VERSION,
        "architecture": repr(recipe.make()),
        "training": recipe.training,
        "train_data": _digest(*train),
        "test_data": _digest(*test),
    }


def to_float(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) or (N, 1, H, W) to float (N, 1, H, W) in [-1, 1]."""
    return pixels_to_float(images.unsqueeze(1) if images.dim() == 3 else images)


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Class predictions for float images (N, 1, H, W) in [-1, 1]."""
    classifier.eval()
    device = next(classifier.parameters()).device
    out = [
        classifier(images[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(classifier: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    images, labels = data
    return (predict(classifier, to_float(images)) == labels).double().mean().item()


def train_classifier(
    train: tuple[Tensor, Tensor],
    log: Callable[[str], None] = print,
    recipe: Recipe | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train the classifier of ``recipe`` (default MNIST's, :data:`TRAINING`) on ``device``: the
    same data gives the same weights (on the CPU: the cached classifiers are trained there)."""
    recipe = recipe or mnist_recipe()
    training = recipe.training
    images, labels = train
    if len(labels) == 0:
        raise UsageError("no training images to train the feature classifier on")
    seed, epochs, batch = training["seed"], training["epochs"], training["batch_size"]
    per_epoch = -(-len(labels) // batch)
    epochs = max(epochs, -(-training.get("min_steps", 0) // per_epoch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = recipe.make().to(device)
    images, labels = images.to(device), labels.to(device)
    order = torch.Generator().manual_seed(seed + 1)
    steps = epochs * per_epoch
    opt = torch.optim.AdamW(
        model.parameters(), lr=training["lr"], weight_decay=training["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, training["lr"], total_steps=steps)
    model.train()
    for epoch in range(epochs):
        start, total, count = time.perf_counter(), 0.0, 0
        perm = torch.randperm(len(labels), generator=order)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch].to(device)
            loss = F.cross_entropy(model(to_float(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        if (epoch + 1) % -(-epochs // 10) == 0 or epoch + 1 == epochs:  # ~10 lines at most
            log(
                f"classifier epoch {epoch + 1}/{epochs}: loss {total / count:.4f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return model.eval()


def load_or_train_classifier(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    cache_dir: str | Path,
    min_accuracy: float | None = None,
    progress: bool = False,
    recipe: Recipe | None = None,
) -> tuple[nn.Module, ClassifierInfo]:
    """The classifier of this protocol from the cache, or trained now and cached.

    Raises:
        UsageError: the cache directory cannot be written, or the trained network's test accuracy
            is below ``min_accuracy`` (metrics in its features would mean little).
    """
    recipe = recipe or mnist_recipe()
    min_accuracy = recipe.min_accuracy if min_accuracy is None else min_accuracy
    log = (lambda msg: print(f"flowdiff: {msg}", file=sys.stderr)) if progress else (lambda _: None)
    protocol = classifier_protocol(train, test, recipe)
    path = cache_path(cache_dir, protocol, recipe.name)
    cached = read_cached(path, protocol, recipe.make, log, "classifier cache")
    if cached is not None:
        model, saved = cached
        return model, ClassifierInfo(path, float(saved["test_accuracy"]), False, protocol)
    check_writable(path.parent, "classifier cache")
    log(f"training the feature classifier (once; cached as {path})")
    model = train_classifier(train, log, recipe)
    test_accuracy = accuracy(model, test)
    log(f"classifier test accuracy {test_accuracy:.4f}")
    if test_accuracy < min_accuracy:
        raise UsageError(
            f"the feature classifier reached {test_accuracy:.4f} test accuracy, below the "
            f"{min_accuracy} the metrics need; it was not cached (evaluate --min-accuracy sets "
            "the floor)"
        )
    payload = {
        "protocol": protocol,
        "state_dict": model.state_dict(),
        "test_accuracy": test_accuracy,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return model, ClassifierInfo(path, test_accuracy, True, protocol)
