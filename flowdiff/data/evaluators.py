"""Evaluators: the metric suite, pictures and likelihood data that fit one kind of data.

A datamodule's ``evaluator()`` returns one of these (:mod:`flowdiff.data.base`). ``flowdiff
evaluate`` runs the protocol (sampling, sharding, the likelihood ODE, the report) and asks the
evaluator only what depends on the data: which labels to sample, how to score samples, the floor,
which data the likelihood is measured on, the pictures. Every number is defined here, once, and
printed with the results (:meth:`Evaluator.protocol`):

- **points** (:class:`PointEvaluator`): samples against as many fresh data points (seed
  ``REFERENCE_SEED``): exact W2 (POT) and the unbiased MMD^2 with RBF kernels of bandwidths
  ``BANDWIDTHS``; floor: other fresh points (``FLOOR_SEED``); NLL in nats on fresh points
  (``NLL_SEED``), exact divergence.
- **images** (:class:`ImageEvaluator`): in the features of a network that suits the images (for
  MNIST flowdiff's own classifier): FID, KID, precision/recall and class accuracy against a seeded
  subset of training images; floor: test images; bits/dim of dequantised test images, Hutchinson.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PROTOCOL_VERSION = 1
REFERENCE_SEED = 1_000_081
FLOOR_SEED = 2_000_081
NLL_SEED = 3_000_081
VALIDATION_SEED = 12_345
BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)


@dataclass
class Column:
    """A metric in the report: its key, header, format and display scale."""

    key: str
    header: str
    fmt: str = "{:.4f}"
    scale: float = 1.0

    def cell(self, metrics: dict) -> str:
        value = metrics.get(self.key)
        return "-" if value is None else self.fmt.format(value * self.scale)


@dataclass
class EvalOptions:
    """Settings of an evaluation that are not part of the data: where caches and weights are."""

    cache_dir: str | None = None
    inception_weights: str | None = None
    min_accuracy: float | None = None  # floor of a feature classifier's test accuracy


@dataclass
class LikelihoodData:
    """What the likelihood is measured on and how it is reported.

    ``x`` (N, *D) and ``y`` (N,) the data and its labels; ``divergence`` exact or hutchinson;
    ``grid_power`` of the RK4 grid (1: uniform; above 1 small steps near t = 1);
    ``convert(log_p) -> values`` in ``unit``; ``description`` for the summary line.
    """

    x: Tensor
    y: Tensor | None
    divergence: str
    grid_power: float
    convert: Callable[[Tensor], Tensor]
    unit: str
    key: str
    description: str
    label: str = ""  # what the summary line calls the value, e.g. "NLL"


class Evaluator:
    """Base class. Defaults of the protocol for this data, then the methods ``evaluate`` calls."""

    columns: list[Column]
    num_samples: int = 1000  # samples a row
    chunk_size: int = 128  # samples integrated at once (part of the protocol)
    nll_samples: int = 256
    per_class: int | None = None  # samples a label in pictures (None: num_samples / labels)
    trajectories: bool = False  # whether pictures show trajectories
    validation_size: int = 2000  # samples a validation picture (unconditional)

    def __init__(self, num_classes: int = 0):
        self.num_classes = num_classes
        self.floor: dict = {}

    def labels(self, n: int) -> Tensor:
        """The label of each sample of a conditional row: balanced, sample i asks for i mod K."""
        return torch.arange(n) % self.num_classes

    def validation_samples(self, num_classes: int) -> int:
        """Samples in a validation picture: ``per_class`` a label, else ``validation_size``."""
        if num_classes and self.per_class:
            return self.per_class * num_classes
        return self.validation_size

    def check(self) -> None:
        """Raise a UsageError now for anything missing (data files, weights): no long work."""

    def prepare(self, num_samples: int, log: Callable[[str], None]) -> None:
        """The long work before scoring (reference features, a feature network); sets ``floor``."""

    def score(self, samples: Tensor, labels: Tensor | None = None) -> dict:
        raise NotImplementedError

    def likelihood_data(self, n: int) -> LikelihoodData:
        raise NotImplementedError

    def protocol(self, num_samples: int) -> dict:
        return {}

    def validation_metrics(self, samples: Tensor) -> dict:
        """Cheap metrics logged at each validation (none unless the data has some)."""
        return {}

    def figure(self, panels: dict, trajectory: Tensor | None = None, title: str = ""):
        """A picture of ``panels`` (name -> (samples, labels or None))."""
        raise NotImplementedError


class PointEvaluator(Evaluator):
    """Points in R^d against fresh draws of the data: ``reference(n, seed) -> (x, y)``; the floor
    is ``floor(n, seed)`` (default: the reference with another seed) against the reference."""

    columns = [Column("w2", "W2"), Column("mmd", "MMD^2 x 1e3", "{:.3f}", 1e3)]
    num_samples = 5000
    chunk_size = 1000
    nll_samples = 1000
    trajectories = True

    def __init__(
        self,
        reference: Callable[[int, int], tuple[Tensor, Tensor]],
        num_classes: int = 0,
        floor: Callable[[int, int], tuple[Tensor, Tensor]] | None = None,
        names: tuple[str, str] = ("fresh data points", "data"),
    ):
        super().__init__(num_classes)
        self.reference = reference
        self.floor_data = floor or reference  # finite data: training points, not held-out ones
        self.names = names  # what the reference and the floor are, for the protocol
        self.target: Tensor | None = None

    def labels(self, n: int) -> Tensor:
        """The labels of the reference points: guided samples follow the data's frequencies."""
        return self.reference(n, REFERENCE_SEED)[1]

    def prepare(self, num_samples: int, log) -> None:
        self.target = self.reference(num_samples, REFERENCE_SEED)[0]
        self.floor = self.score(self.floor_data(num_samples, FLOOR_SEED)[0])

    def score(self, samples: Tensor, labels: Tensor | None = None) -> dict:
        from flowdiff.metrics.points import mmd, wasserstein2

        target = self.target if self.target is not None else self.reference(len(samples), 0)[0]
        return {"w2": wasserstein2(samples, target), "mmd": mmd(samples, target, BANDWIDTHS)}

    def likelihood_data(self, n: int) -> LikelihoodData:
        x, y = self.reference(n, NLL_SEED)
        return LikelihoodData(
            x, y, "exact", 1.0, lambda log_p: -log_p, "nats a point", "nll",
            f"{n} fresh points (seed {NLL_SEED}), exact divergence", "NLL",
        )  # fmt: skip

    def protocol(self, num_samples: int) -> dict:
        return {
            "reference": f"{num_samples} {self.names[0]}, seed {REFERENCE_SEED}",
            "floor": f"{self.names[1]} (seed {FLOOR_SEED})",
            "W2": "exact (POT network simplex)",
            "MMD^2": f"unbiased, sum of RBF kernels, bandwidths {list(BANDWIDTHS)}",
        }

    def validation_metrics(self, samples: Tensor) -> dict:
        from flowdiff.metrics.points import mmd, wasserstein2

        data = self.reference(len(samples), VALIDATION_SEED)[0]
        return {"w2": wasserstein2(samples, data), "mmd": mmd(samples, data, BANDWIDTHS)}

    def figure(self, panels: dict, trajectory: Tensor | None = None, title: str = ""):
        from flowdiff.plots import plot_labelled_points, plot_points

        def plane(x: Tensor) -> Tensor:  # points of any dimension: the first two coordinates
            x = x.flatten(x.dim() - len(self.reference(1, 0)[0].shape[1:]))
            return torch.cat([x, torch.zeros_like(x)], -1)[..., :2] if x.shape[-1] == 1 else x

        panels = {name: (plane(x), y) for name, (x, y) in panels.items()}
        first = next(iter(panels.values()))[0]
        data = plane(self.reference(len(first), VALIDATION_SEED)[0])
        trajectory = plane(trajectory) if trajectory is not None else None
        if len(panels) == 1 and next(iter(panels.values()))[1] is None:
            return plot_points(first, data, trajectory, title=title)
        return plot_labelled_points(panels, data, title=title)


@dataclass
class ImageSource:
    """The images an :class:`ImageEvaluator` compares with, as uint8 (N, C, H, W) and labels.

    ``load()`` returns ``(train, test)``: the reference is a seeded subset of ``train``, the floor
    and the likelihood use ``test``. ``features(train, test, log, options)`` returns the feature
    network (``features(x)``, and class logits from ``forward``) and a line describing it, or
    ``(None, why)`` when the data has none (no labels to train a classifier on). ``check()``
    raises a UsageError when the images cannot be had; ``to_float`` maps uint8 pixels to the
    model's range.
    """

    load: Callable[[], tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]
    features: Callable
    to_float: Callable[[Tensor], Tensor]
    check: Callable[[], object] = lambda: None
    reference_size: int = 10_000
    classifier: bool = True  # whether ``features`` gives a network (labelled data)


NO_FEATURES = (
    "FD, KID, precision/recall and class accuracy need labels (a classifier is trained on them) "
    "and Inception FID/KID needs --inception-weights: this data has neither, so the table shows "
    "bits/dim alone"
)


class ImageEvaluator(Evaluator):
    """Images in the features of a network that suits them (see :class:`ImageSource`), and of
    Inception-v3 when the user has its weights (:mod:`flowdiff.metrics.inception`)."""

    num_samples = 1000
    chunk_size = 128
    nll_samples = 256
    per_class = 8
    validation_size = 32

    def __init__(
        self,
        source: ImageSource,
        num_classes: int,
        options: EvalOptions | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__(num_classes)
        self.source, self.options = source, options or EvalOptions()
        self.class_names = class_names
        self.columns = []
        if source.classifier:
            self.columns += [
                Column("fid", "FID", "{:.3f}"),
                Column("kid_mean", "KID", "{:.3f}"),  # in these features: not ~1e-3
                Column("precision", "precision", "{:.3f}"),
                Column("recall", "recall", "{:.3f}"),
            ]
            if num_classes:
                self.columns.append(Column("class_accuracy", "accuracy", "{:.3f}"))
        if self.options.inception_weights:
            self.columns += [
                Column("inception_fid", "Inception FID", "{:.2f}"),
                Column("inception_kid", "Inception KID x 1e3", "{:.2f}", 1e3),
            ]
        self._data = None
        self.metrics = self.inception = None
        self.feature_info = None

    def check(self) -> None:
        self.source.check()
        if self.options.inception_weights is not None:
            from flowdiff.metrics.inception import check_inception

            check_inception(self.options.inception_weights)

    def data(self):
        if self._data is None:
            self._data = self.source.load()
        return self._data

    def prepare(self, num_samples: int, log) -> None:
        from flowdiff.metrics.images import ImageMetrics

        train, test = self.data()
        g = torch.Generator().manual_seed(REFERENCE_SEED)
        size = min(self.source.reference_size, len(train[1]))
        self.reference = self.source.to_float(
            train[0][torch.randperm(len(train[1]), generator=g)[:size]]
        )
        classifier, self.feature_info = self.source.features(train, test, log, self.options)
        if classifier is not None:
            self.metrics = ImageMetrics(classifier, self.reference, self.num_classes)
        if self.options.inception_weights:
            from flowdiff.metrics.inception import load_inception, reference_features
            from flowdiff.utils import default_cache

            weights = self.options.inception_weights
            extract = load_inception(weights)
            cache = self.options.cache_dir or default_cache()
            self.inception = (
                extract,
                reference_features(extract, self.reference, weights, cache, log),
            )
        if self.metrics is None and self.inception is None:
            log(NO_FEATURES)
        g = torch.Generator().manual_seed(FLOOR_SEED)
        pick = torch.randperm(len(test[1]), generator=g)[: min(num_samples, len(test[1]))]
        self.floor_size = len(pick)
        self.floor = self.score(self.source.to_float(test[0][pick]), test[1][pick])

    def score(self, samples: Tensor, labels: Tensor | None = None) -> dict:
        metrics = self.metrics.compare(samples, labels) if self.metrics is not None else {}
        if self.inception is not None:
            from flowdiff.metrics.images import frechet_distance, kernel_distance
            from flowdiff.metrics.inception import inception_features

            extract, real = self.inception
            fake = inception_features(extract, samples)
            metrics["inception_fid"] = frechet_distance(real, fake)
            metrics["inception_kid"] = kernel_distance(real, fake)[0]
        return metrics

    def likelihood_data(self, n: int) -> LikelihoodData:
        from flowdiff.metrics.pixels import bits_per_dim, dequantize

        images, labels = self.data()[1]
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(NLL_SEED))[:n]
        pixels = images[pick]
        x = dequantize(pixels, torch.Generator().manual_seed(NLL_SEED + 1))
        dims = pixels[0].numel()
        return LikelihoodData(
            x.contiguous(memory_format=torch.channels_last), labels[pick], "hutchinson", 2.0,
            lambda log_p: bits_per_dim(log_p, dims), "bits/dim", "bits_per_dim",
            f"{len(pick)} test images, seed {NLL_SEED}; uniform dequantisation",
        )  # fmt: skip

    def protocol(self, num_samples: int) -> dict:
        metrics = []
        if self.metrics is not None:
            metrics.append("FID and KID (torchmetrics), precision/recall (k-NN, k=3), accuracy")
        if self.inception is not None:
            metrics.append(f"Inception FID/KID ({self.options.inception_weights})")
        out = {
            "feature network": self.feature_info,
            "reference": f"{len(self.reference)} training images (seed {REFERENCE_SEED})",
            "floor": f"data ({self.floor_size} held-out images)",
            "metrics": "; ".join(metrics) or NO_FEATURES,
        }
        if self.num_classes:
            out["labels"] = f"sample i asks for class i mod {self.num_classes}"
        return out

    def figure(self, panels: dict, trajectory: Tensor | None = None, title: str = ""):
        from flowdiff.plots import labelled_grid, plot_image_grids

        grids = {
            name: labelled_grid(images, labels, self.class_names)
            for name, (images, labels) in panels.items()
        }
        return plot_image_grids(grids, title=title)
