"""Image metrics in the features of flowdiff's MNIST classifier (``flowdiff.metrics.classifier``).

- Every image the classifier sees, sample or reference, is first clamped to [-1, 1] and rounded
  to the 8-bit levels of the data's pixel map (:func:`quantize`), as a saved image would be.
- Fréchet distance and KID: torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance`` given a custom feature extractor. The features of each image set are
  computed once (the reference's once for all the sets it is compared with) and handed to
  torchmetrics through :class:`Features`, an identity "extractor" that declares their width.
- Precision and recall: the k-nearest-neighbour manifolds of Kynkäänniemi et al. (2019), k = 3,
  with as many reference images as samples.
- Class accuracy: the classifier's prediction on a sample against the label it was drawn for,
  overall and per class.
- Inception FID and KID (optional): :mod:`flowdiff.metrics.inception`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PR_K = 3
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0
PIXEL_SCALE = 127.5  # the data's pixel map: 8-bit level v in 0..255 <-> v / PIXEL_SCALE - 1


def _levels(images: Tensor) -> Tensor:
    """Float images to the nearest 8-bit level v in 0..255 (float), clamped."""
    return ((images.float() + 1) * PIXEL_SCALE).round().clamp(0, 255)


def quantize(images: Tensor) -> Tensor:
    """Float images clamped to [-1, 1] and rounded to the nearest level ``v / 127.5 - 1``
    (float32)."""
    return _levels(images).div(PIXEL_SCALE).sub(1.0)


class Features(nn.Module):
    """Hands precomputed features (N, num_features) to torchmetrics as if it extracted them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def extract(classifier: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """The classifier's features (N, F), float64, of float images (N, C, H, W), quantised."""
    classifier.eval()
    device = next(classifier.parameters()).device
    chunks = [
        classifier.features(quantize(images[i : i + batch_size].to(device))).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=Features(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kernel_distance(real: Tensor, fake: Tensor, seed: int = KID_SEED) -> tuple[float, float]:
    """KID (mean, std over random subsets) by torchmetrics, with seeded subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    kid = KernelInceptionDistance(
        feature=Features(real.shape[1]), subsets=KID_SUBSETS, subset_size=size
    )
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def _kth_radius(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = [
        torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values  # +1: itself, at 0
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(radii)


def _covered(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    """Whether each point lies in some ball (centre, radius)."""
    inside = [
        (torch.cdist(points[i : i + chunk], centres) <= radii).any(dim=1)
        for i in range(0, len(points), chunk)
    ]
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): the share of ``fake`` inside the
    k-NN manifold of ``real``, and of ``real`` inside that of ``fake``."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points a set")
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_radius(real, k)).double().mean()
    recall = _covered(real, fake, _kth_radius(fake, k)).double().mean()
    return float(precision), float(recall)


class ImageMetrics:
    """Compares image sets with one reference set in the classifier's features.

    Args:
        classifier: a ``flowdiff.metrics.classifier`` network (``features`` and logits).
        real_images: the reference, float (N, C, H, W) in [-1, 1]; its features are computed once.
        num_classes: classes of the per-class accuracy.

    Samples and reference are both quantised (:func:`quantize`) before the classifier sees them.
    """

    def __init__(self, classifier: nn.Module, real_images: Tensor, num_classes: int = 10):
        self.classifier, self.num_classes = classifier.eval(), num_classes
        self.real = extract(classifier, real_images)

    def compare(self, images: Tensor, labels: Tensor | None = None) -> dict:
        """FID, KID, precision and recall of ``images`` against the reference; with ``labels``
        (the class each image was drawn for, or its true class), the classifier's accuracy."""
        fake = extract(self.classifier, images)
        kid_mean, kid_std = kernel_distance(self.real, fake)
        # As many reference points as samples: manifold radii shrink with the number of points.
        # A set of k points or fewer (a tiny held-out split) has no k-NN manifold: no value.
        few = min(len(fake), len(self.real)) <= PR_K
        precision, recall = (None, None) if few else precision_recall(self.real[: len(fake)], fake)
        out = {
            "fid": frechet_distance(self.real, fake),
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
        }
        if labels is not None:
            out.update(class_accuracy(self.classifier, images, labels, self.num_classes))
        return out


def class_accuracy(
    classifier: nn.Module, images: Tensor, labels: Tensor, num_classes: int = 10
) -> dict:
    """The share of (quantised) images classified as the label they carry, overall and per class
    (``None`` for a class with no image)."""
    from flowdiff.metrics.classifier import predict

    labels = labels.cpu()
    hit = (predict(classifier, quantize(images)) == labels).double()
    per_class = [
        hit[labels == c].mean().item() if bool((labels == c).any()) else None
        for c in range(num_classes)
    ]
    return {"class_accuracy": hit.mean().item(), "class_accuracy_per_class": per_class}
