"""The evaluation of captioned images (:class:`CaptionedImageEvaluator`): samples drawn for the
captions of held-out images (the prompts), scored for prompt adherence and against those images.

- **prompts**: the captions of ``num_samples`` held-out images (``REFERENCE_SEED``); sample i is
  drawn for prompt i.
- **FD** (Fréchet distance) of the samples against those images in the features of a network
  that suits the data (here: the image tower of the contrastive model; the Shapes data: its
  attribute classifier); floor: other held-out images (``FLOOR_SEED``, their own captions)
  against the same reference.
- **R-precision** in a contrastive image-text model trained once on the data's own training
  split and cached (:mod:`flowdiff.metrics.contrastive`, :func:`flowdiff.metrics.text.r_precision`).
- **CLIP score** with ``--clip DIR`` (a local CLIP checkpoint; skipped with a note without
  ``transformers``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowdiff.data.evaluators import (
    FLOOR_SEED,
    NLL_SEED,
    REFERENCE_SEED,
    Column,
    EvalOptions,
    LikelihoodData,
)
from flowdiff.data.image_evaluation import ImageEvaluatorBase
from flowdiff.metrics.pixels import pixels_to_float

R_SEED = 4_000_081  # the distractors of R-precision


class CaptionedImageEvaluator(ImageEvaluatorBase):
    """Prompt adherence and FD of captioned images.

    Args:
        train_pairs: ``() -> (images, captions)``: the training split, uint8 (N, C, H, W) and
            each image's captions (a list of strings each): the contrastive model learns them.
        reference: ``(n, seed) -> (images, captions)``: ``n`` held-out uint8 images chosen by
            ``seed`` and one caption each.
        data_shape: (C, H, W).
        options: cache folder, ``clip`` checkpoint.
    """

    def __init__(
        self,
        train_pairs: Callable[[], tuple[Tensor, list[list[str]]]],
        reference: Callable[[int, int], tuple[Tensor, list[str]]],
        data_shape: tuple[int, ...] | list[int],
        options: EvalOptions | None = None,
    ):
        super().__init__(0)
        self.train_pairs, self.reference_pairs = train_pairs, reference
        self.data_shape = tuple(data_shape)
        self.options = options or EvalOptions()
        self.class_names = None
        self.columns = [Column("fd", "FD", "{:.3f}"), Column("r_precision", "R-prec", "{:.3f}")]
        if self.options.clip:
            self.columns.append(Column("clip_score", "CLIP score", "{:.2f}"))
        self.contrastive = self.clip = None
        self.clip_note: str | None = None
        self.notes: dict = {}

    # -- what evaluate asks --------------------------------------------------------------------

    def prompts(self, n: int) -> list[str]:
        """The prompt of each of ``n`` samples: the captions of ``n`` held-out images."""
        return list(self.reference_pairs(n, REFERENCE_SEED)[1])

    def labels(self, n: int) -> Tensor:
        """Sample i is drawn for prompt i (:meth:`prompts`)."""
        return torch.arange(n)

    def check(self) -> None:
        if self.options.clip:
            from flowdiff.metrics.text import check_clip

            self.clip_note = check_clip(self.options.clip)

    def groups(self, captions: list[str]) -> Tensor:
        """Captions that say the same thing (never each other's R-precision distractors): here
        those with the same words in the same order."""
        from flowdiff.text.tokenizer import words

        keys: dict = {}
        return torch.tensor([keys.setdefault(" ".join(words(c)), len(keys)) for c in captions])

    def feature_network(self, log) -> tuple[object, str]:
        """The network whose ``features`` the FD uses, and a line saying which."""
        return self.contrastive, "the contrastive model's image tower (128 features)"

    def prepare(self, num_samples: int, log) -> None:
        from flowdiff.metrics.contrastive import load_or_train_contrastive
        from flowdiff.metrics.images import extract
        from flowdiff.utils import default_cache

        cache = self.options.cache_dir or default_cache()
        images, captions = self.train_pairs()
        self.contrastive, path, trained = load_or_train_contrastive(
            images, captions, self.data_shape, cache, log
        )
        log(f"contrastive model {'trained' if trained else 'loaded'}: {path}")
        self.notes["contrastive model"] = f"{path.name}, trained on {len(images)} training images"
        if self.options.clip and self.clip_note is None:
            from flowdiff.metrics.text import ClipScore

            self.clip = ClipScore(self.options.clip)
        features, self.notes["feature network"] = self.feature_network(log)
        pixels, self.prompt_list = self.reference_pairs(num_samples, REFERENCE_SEED)
        self.features_of = features
        self.reference_features = extract(features, pixels_to_float(pixels))
        floor_pixels, floor_captions = self.reference_pairs(num_samples, FLOOR_SEED)
        self.floor_size = len(floor_pixels)
        self.floor = self.score_captioned(pixels_to_float(floor_pixels), floor_captions)

    def score(self, samples: Tensor, labels: Tensor | None = None) -> dict:
        """Samples drawn for the prompts ``labels`` (indices into :meth:`prompts`)."""
        index = labels if labels is not None else torch.arange(len(samples))
        return self.score_captioned(samples, [self.prompt_list[i] for i in index.tolist()], index)

    def score_captioned(self, images: Tensor, captions: list[str], index=None) -> dict:
        """Metrics of float images (N, C, H, W) that should show ``captions``: ``index`` says
        which prompt each caption is (None: the captions are the prompts, in order)."""
        from flowdiff.metrics.contrastive import embed_images, embed_texts
        from flowdiff.metrics.images import extract, frechet_distance
        from flowdiff.metrics.text import r_precision

        index = torch.arange(len(images)) if index is None else index
        pool = list(self.prompt_list)  # the candidates: the prompts, each image's own wording
        for i, text in zip(index.tolist(), captions, strict=True):
            pool[i] = text
        generator = torch.Generator().manual_seed(R_SEED)
        metrics = {
            "fd": frechet_distance(self.reference_features, extract(self.features_of, images)),
            "r_precision": r_precision(
                embed_images(self.contrastive, images),
                embed_texts(self.contrastive, pool),
                index,
                self.groups(pool),
                generator,
            ),
        }
        if self.clip is not None:
            metrics["clip_score"] = self.clip(images, captions)
        return metrics

    def likelihood_data(self, n: int) -> LikelihoodData:
        pixels, captions = self.reference_pairs(n, NLL_SEED)
        return self.pixel_likelihood(
            pixels, captions, f"{len(pixels)} held-out images, seed {NLL_SEED}"
        )

    def protocol(self, num_samples: int) -> dict:
        from flowdiff.metrics.text import R_CANDIDATES

        out = {
            "prompts": f"the captions of {num_samples} held-out images (seed {REFERENCE_SEED}); "
            "sample i is drawn for prompt i",
            **self.notes,
            "reference": f"those {num_samples} held-out images",
            "floor": f"data ({self.floor_size} other held-out images, seed {FLOOR_SEED})",
            "R-precision": f"own prompt first among {R_CANDIDATES} (distractors: captions of "
            f"other content, seed {R_SEED}), cosine in the contrastive model",
        }
        if self.options.clip:
            out["CLIP score"] = self.clip_note or f"100 max(cos, 0), {self.options.clip}"
        return out
