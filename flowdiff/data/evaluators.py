"""Evaluators: the metric suite, pictures and likelihood data that fit one kind of data.

A datamodule's ``evaluator()`` returns one of these (:mod:`flowdiff.data.base`). ``flowdiff
evaluate`` runs the protocol (sampling, sharding, the likelihood ODE, the report) and asks the
evaluator only what depends on the data: which labels to sample, how to score samples, the floor,
which data the likelihood is measured on, the pictures. The seeds and the base class are defined
here, once, and every protocol is printed with its results (:meth:`Evaluator.protocol`):

- **points** (:class:`PointEvaluator`): samples against as many fresh data points (seed
  ``REFERENCE_SEED``): exact W2 (POT) and the unbiased MMD^2 with RBF kernels of bandwidths
  ``BANDWIDTHS``; floor: other fresh points (``FLOOR_SEED``); NLL in nats on fresh points
  (``NLL_SEED``), exact divergence.
- **images** (:class:`flowdiff.data.image_evaluation.ImageEvaluator`): in the features of a
  network that suits the images (a classifier flowdiff trains on them; Inception with its
  weights): FID, KID, precision/recall and class accuracy against a seeded subset of training
  images; floor: held-out images; bits/dim of dequantised held-out images, Hutchinson.
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
    # Whether `flowdiff evaluate` measures the straightness of the ODE unless told: 100 Euler
    # steps a sample, cheap on points, as much as a 100-step row on images.
    measures_straightness: bool = False
    validation_size: int = 2000  # samples a validation picture (unconditional)
    # Captioned data: the n captions a conditional row asks for (held-out ones), set by the data.
    prompts: Callable[[int], list[str]] | None = None

    def __init__(self, num_classes: int = 0):
        self.num_classes = num_classes
        self.floor: dict = {}

    def labels(self, n: int) -> Tensor | list[str]:
        """The label of each sample of a conditional row: balanced, sample i asks for i mod K
        (captioned data: the data's ``prompts``)."""
        if self.prompts is not None:
            return self.prompts(n)
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

    def figure(
        self,
        panels: dict,
        trajectory: Tensor | None = None,
        title: str = "",
        names: list[str] | None = None,
    ):
        """A picture of ``panels`` (name -> (samples, labels or None)); ``names[k]`` says what
        label k asked for (default: the class names; prompts for a text model)."""
        raise NotImplementedError


class PointEvaluator(Evaluator):
    """Points in R^d against fresh draws of the data: ``reference(n, seed) -> (x, y)``; the floor
    is ``floor(n, seed)`` (default: the reference with another seed) against the reference."""

    columns = [Column("w2", "W2"), Column("mmd", "MMD^2 x 1e3", "{:.3f}", 1e3)]
    num_samples = 5000
    chunk_size = 1000
    nll_samples = 1000
    trajectories = True
    measures_straightness = True

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

    def figure(self, panels: dict, trajectory=None, title: str = "", names=None):
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
