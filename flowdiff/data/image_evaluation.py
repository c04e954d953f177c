"""The evaluation of any image data that a datamodule holds as uint8 (an image folder, a tensor
file of images): a classifier trained once on the data's own training split when it has labels
(:func:`flowdiff.metrics.classifier.image_recipe`), Inception features when the user has them,
bits/dim always (:class:`flowdiff.data.evaluators.ImageEvaluator`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from flowdiff.data.evaluators import EvalOptions, ImageSource
from flowdiff.metrics.pixels import pixels_to_float

Split = tuple[Tensor, Tensor]


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
