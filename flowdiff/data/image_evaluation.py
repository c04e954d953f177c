"""The evaluation of images (:class:`ImageEvaluator`): in the features of a network that suits
them (MNIST's own classifier; for any other labelled uint8 images, an image folder, CIFAR-10 or a
tensor file, a classifier trained once on the data's own training split, :func:`labelled_source`),
in Inception's when the user has its weights, and bits/dim always."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowdiff.data.evaluators import (
    FLOOR_SEED,
    NLL_SEED,
    REFERENCE_SEED,
    Column,
    EvalOptions,
    Evaluator,
    LikelihoodData,
)
from flowdiff.metrics.pixels import pixels_to_float

Split = tuple[Tensor, Tensor]


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
    "FID, KID, precision/recall and class accuracy need labels (a classifier is trained on them) "
    "and Inception FID/KID needs --inception-weights: this data has neither, so the table shows "
    "bits/dim alone"
)


class ImageEvaluatorBase(Evaluator):
    """What the image evaluators share (:class:`ImageEvaluator`, and the captioned one of
    :mod:`flowdiff.data.caption_evaluation`): sample counts sized for images, bits/dim of
    dequantized held-out images, pictures as labelled grids."""

    num_samples = 1000
    chunk_size = 128
    nll_samples = 256
    per_class = 8
    validation_size = 32
    class_names: list[str] | None = None  # the row names of pictures when none are given

    @staticmethod
    def pixel_likelihood(pixels: Tensor, labels, note: str) -> LikelihoodData:
        """Bits/dim of uint8 ``pixels`` (with their labels or captions), uniformly dequantized
        (seed ``NLL_SEED + 1``); ``note`` says which images they are."""
        from flowdiff.metrics.pixels import bits_per_dim, dequantize

        x = dequantize(pixels, torch.Generator().manual_seed(NLL_SEED + 1))
        dims = pixels[0].numel()
        return LikelihoodData(
            x.contiguous(memory_format=torch.channels_last), labels, "hutchinson", 2.0,
            lambda log_p: bits_per_dim(log_p, dims), "bits/dim", "bits_per_dim",
            f"{note}; uniform dequantisation",
        )  # fmt: skip

    def figure(self, panels: dict, trajectory=None, title: str = "", names=None):
        from flowdiff.plots import labelled_grid, plot_image_grids

        grids = {
            name: labelled_grid(images, labels, names or self.class_names)
            for name, (images, labels) in panels.items()
        }
        return plot_image_grids(grids, title=title)


class ImageEvaluator(ImageEvaluatorBase):
    """Images in the features of a network that suits them (see :class:`ImageSource`), and of
    Inception-v3 when the user has its weights (:mod:`flowdiff.metrics.inception`)."""

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
        images, labels = self.data()[1]
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(NLL_SEED))[:n]
        return self.pixel_likelihood(
            images[pick], labels[pick], f"{len(pick)} test images, seed {NLL_SEED}"
        )

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


def labelled_source(
    load: Callable[[], tuple[Split, Split]],
    data_shape,
    num_classes: int,
    check: Callable[[], object] = lambda: None,
) -> ImageSource:
    """An :class:`ImageSource` over ``load() -> (train, test)`` uint8 images: with
    ``num_classes`` > 0 its feature network is a classifier trained on ``train`` (cached);
    without labels it has none."""

    def features(train: Split, test: Split, log, options: EvalOptions):
        if not num_classes:
            return None, "none (the data has no labels)"
        from flowdiff.metrics.classifier import image_recipe, load_or_train_classifier
        from flowdiff.utils import default_cache

        cache = options.cache_dir or default_cache()
        recipe = image_recipe(data_shape, num_classes)
        log(f"feature classifier: cache {cache}")
        model, info = load_or_train_classifier(
            train, test, cache, options.min_accuracy, progress=True, recipe=recipe
        )
        state = "trained" if info.trained else "loaded"
        log(f"classifier {state}: {info.path} (held-out accuracy {info.test_accuracy:.4f})")
        line = f"flowdiff image classifier {info.path.name} (held-out accuracy "
        return model, line + f"{info.test_accuracy:.4f})"

    return ImageSource(load, features, pixels_to_float, check, classifier=bool(num_classes))


def folder_source(datamodule) -> ImageSource:
    """The images of an :class:`~flowdiff.data.images.ImageFolderDataModule`: the training split
    (classifier, reference) and the held-out split (floor, bits/dim)."""

    def load() -> tuple[Split, Split]:
        images, labels = datamodule.tensors()
        train, held_out = datamodule.split()
        return (images[train], labels[train]), (images[held_out], labels[held_out])

    return labelled_source(load, datamodule.data_shape, datamodule.num_classes, datamodule.cache)
