"""The evaluation of the Shapes data (:mod:`flowdiff.data.shapes`): the captioned-image metrics
(:mod:`flowdiff.data.caption_evaluation`: FD, R-precision, CLIP score) and **per-attribute
accuracy**, split into the combinations seen in training and those held out.

The attributes of an image are read by an attribute classifier: flowdiff's
:class:`~flowdiff.metrics.classifier.ImageClassifier` over all 96 combinations (its prediction
gives the four attributes), trained once on :data:`CLASSIFIER_TRAIN` images of every
combination drawn by the generator (seed :data:`CLASSIFIER_SEED`) and cached as the labelled-image
classifiers are (:func:`~flowdiff.metrics.classifier.load_or_train_classifier`); its features
are the FD's feature space, as for other labelled images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.data.caption_evaluation import CaptionedImageEvaluator
from flowdiff.data.evaluators import Column, EvalOptions
from flowdiff.data.shapes_draw import ATTRIBUTES, COMBINATIONS, HELD_OUT, draw_shapes, parse_caption

CLASSIFIER_SEED = 5_000_081
CLASSIFIER_TRAIN, CLASSIFIER_TEST = 12_000, 2_000
GROUPS = ("seen", "held_out")


class ShapesEvaluator(CaptionedImageEvaluator):
    """Captioned-image metrics and per-attribute accuracy of the Shapes data."""

    def __init__(self, datamodule, options: EvalOptions | None = None):
        def train_pairs():
            images, table = datamodule.train_data()
            return images, table.captions

        def reference(n: int, seed: int):
            images, _, captions = datamodule.reference_pixels(n, seed)
            return images, captions

        super().__init__(train_pairs, reference, datamodule.data_shape, options)
        self.image_size = datamodule.data_shape[-1]
        self.held_out = torch.tensor([COMBINATIONS.index(c) in self._held() for c in COMBINATIONS])
        self.columns += [Column("seen_all", "all right (seen)", "{:.3f}"),
                         Column("held_out_all", "all right (held-out)", "{:.3f}")]  # fmt: skip
        self.columns += [Column(f"held_out_{a}", f"{a} (h)", "{:.3f}") for a in ATTRIBUTES]
        self.classifier = None

    @staticmethod
    def _held() -> set[int]:
        return {COMBINATIONS.index(c) for c in HELD_OUT}

    def groups(self, captions: list[str]) -> Tensor:
        """The combination each caption names: its wordings never distract each other."""
        return torch.tensor([parse_caption(c) for c in captions])

    def classifier_data(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(train, test) images of all combinations, uniformly, with their combinations."""
        g = torch.Generator().manual_seed(CLASSIFIER_SEED)
        n = CLASSIFIER_TRAIN + CLASSIFIER_TEST
        combos = torch.randint(len(COMBINATIONS), (n,), generator=g)
        images = draw_shapes(combos, self.image_size, g)
        cut = CLASSIFIER_TRAIN
        return (images[:cut], combos[:cut]), (images[cut:], combos[cut:])

    def feature_network(self, log):
        from flowdiff.metrics.classifier import image_recipe, load_or_train_classifier
        from flowdiff.utils import default_cache

        train, test = self.classifier_data()
        recipe = image_recipe(self.data_shape, len(COMBINATIONS))
        recipe.name = "shapes-classifier"
        cache = self.options.cache_dir or default_cache()
        self.classifier, info = load_or_train_classifier(
            train, test, cache, self.options.min_accuracy, progress=True, recipe=recipe
        )
        log(f"attribute classifier {'trained' if info.trained else 'loaded'}: {info.path} "
            f"(held-out accuracy {info.test_accuracy:.4f})")  # fmt: skip
        line = f"attribute classifier {info.path.name} over the {len(COMBINATIONS)} combinations"
        return self.classifier, f"{line} (held-out accuracy {info.test_accuracy:.4f})"

    def score_captioned(self, images: Tensor, captions: list[str], index=None) -> dict:
        metrics = super().score_captioned(images, captions, index)
        return {**metrics, **self.attribute_accuracy(images, captions)}

    def attribute_accuracy(self, images: Tensor, captions: list[str]) -> dict:
        """Per attribute and group (seen / held-out combination), the share of images whose
        attribute the classifier reads as the caption says; ``<group>_all``: every attribute."""
        from flowdiff.metrics.classifier import predict
        from flowdiff.metrics.images import quantize

        asked = torch.tensor([parse_caption(c) for c in captions])
        got = predict(self.classifier, quantize(images))
        table = torch.tensor([[values.index(v) for values, v in zip(ATTRIBUTES.values(), c,
                                                                    strict=True)]
                              for c in COMBINATIONS])  # fmt: skip
        right = table[asked] == table[got]  # (N, 4)
        out = {}
        for group, rows in zip(GROUPS, (~self.held_out[asked], self.held_out[asked]), strict=True):
            if rows.any():
                for k, name in enumerate(ATTRIBUTES):
                    out[f"{group}_{name}"] = right[rows, k].double().mean().item()
                out[f"{group}_all"] = right[rows].all(1).double().mean().item()
        return out

    def protocol(self, num_samples: int) -> dict:
        return {
            **super().protocol(num_samples),
            "attributes": "read by the attribute classifier; seen: the "
            f"{len(COMBINATIONS) - len(HELD_OUT)} training combinations, held-out: the "
            f"{len(HELD_OUT)} of shapes.HELD_OUT (prompts alternate between them)",
        }
