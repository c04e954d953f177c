"""2D toy datasets at the shapes and noise levels of FFJORD's toy data.

FFJORD (Grathwohl et al., 2019, ``lib/toy_data.py``) fixed the 2D benchmarks most papers since use;
the generators below follow its scales and noise levels, written in torch with a seeded generator.
Each point carries a label (its mixture component, moon, ring, arm or square colour), so
conditional toy runs are possible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from flowdiff.data.base import FlowDataModule
from flowdiff.data.evaluators import EvalOptions, PointEvaluator
from flowdiff.data.labels import LabelDropout
from flowdiff.utils import UsageError

Generator = torch.Generator


def moons(n: int, g: Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles (sklearn ``make_moons``, noise 0.1), scaled by 2, shifted by
    (-1, -0.2). Labels: which moon."""
    y = torch.randint(0, 2, (n,), generator=g)
    angle = torch.rand(n, generator=g) * math.pi
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)
    x = torch.where(y[:, None] == 0, upper, lower) + 0.1 * torch.randn(n, 2, generator=g)
    return x * 2 + torch.tensor([-1.0, -0.2]), y


def circles(n: int, g: Generator) -> tuple[Tensor, Tensor]:
    """Two concentric circles (sklearn ``make_circles``, factor 0.5, noise 0.08), scaled by 3.
    Labels: 0 outer ring, 1 inner ring."""
    y = torch.randint(0, 2, (n,), generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = torch.where(y == 0, 1.0, 0.5)
    x = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return 3 * (x + 0.08 * torch.randn(n, 2, generator=g)), y


EIGHT_RADIUS, EIGHT_STD, EIGHT_SCALE = 4.0, 0.5, 1.414  # eight_gaussians' shape


def eight_gaussians(n: int, g: Generator) -> tuple[Tensor, Tensor]:
    """Eight Gaussians (std 0.5) on a circle of radius 4, divided by 1.414. Labels: which one."""
    y = torch.randint(0, 8, (n,), generator=g)
    angle = y * (math.pi / 4)
    centers = EIGHT_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (centers + EIGHT_STD * torch.randn(n, 2, generator=g)) / EIGHT_SCALE, y


def eight_gaussians_mixture() -> tuple[Tensor, Tensor, Tensor]:
    """The mixture :func:`eight_gaussians` draws from: weights (8,), means (8, 2), stds (8,)
    (e.g. for its exact field, :class:`flowdiff.testing.GaussianMixtureField`)."""
    angle = torch.arange(8) * (math.pi / 4)
    means = EIGHT_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1) / EIGHT_SCALE
    return torch.full((8,), 1 / 8), means, torch.full((8,), EIGHT_STD / EIGHT_SCALE)


def checkerboard(n: int, g: Generator) -> tuple[Tensor, Tensor]:
    """Eight filled unit squares of a 4x4 checkerboard on [-4, 4]^2. Labels: which square."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = (
        torch.rand(n, generator=g)
        - 2 * torch.randint(0, 2, (n,), generator=g)
        + torch.floor(x1) % 2
    )
    x = 2 * torch.stack([x1, x2], 1)
    col = torch.floor(x1).long() + 2  # 0..3
    row = torch.floor(x2).long() + 2  # 0..3
    return x, (row * 4 + col) // 2


def two_spirals(n: int, g: Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved spirals (FFJORD ``2spirals``). Labels: which arm."""
    y = torch.randint(0, 2, (n,), generator=g)
    r = torch.sqrt(torch.rand(n, generator=g)) * 540 * (2 * math.pi) / 360
    arm = (
        torch.stack([-torch.cos(r) * r, torch.sin(r) * r], 1) + torch.rand(n, 2, generator=g) * 0.5
    )
    sign = torch.where(y == 0, 1.0, -1.0)[:, None]
    return sign * arm / 3 + 0.1 * torch.randn(n, 2, generator=g), y


class GaussianMixture:
    """A configurable isotropic mixture ``sum_k pi_k N(mu_k, s_k^2 I)``. Labels: the component."""

    def __init__(
        self,
        means: Sequence[Sequence[float]],
        stds: Sequence[float] | float = 0.5,
        weights: Sequence[float] | None = None,
    ):
        self.means = torch.tensor(means, dtype=torch.float32)
        k = len(self.means)
        self.stds = (
            torch.full((k,), float(stds)) if isinstance(stds, (int, float)) else torch.tensor(stds)
        )
        weights = torch.ones(k) if weights is None else torch.tensor(weights, dtype=torch.float32)
        if (
            len(self.stds) != k
            or len(weights) != k
            or (weights < 0).any()
            or (self.stds <= 0).any()
        ):
            raise ValueError("mixture needs one positive std and one weight >= 0 per mean")
        self.weights = weights / weights.sum()

    def __call__(self, n: int, g: Generator) -> tuple[Tensor, Tensor]:
        y = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[y] + self.stds[y, None] * torch.randn(n, 2, generator=g), y


DATASETS: dict[str, Callable[[int, Generator], tuple[Tensor, Tensor]]] = {
    "moons": moons,
    "circles": circles,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
}
NUM_CLASSES = {"moons": 2, "circles": 2, "8gaussians": 8, "checkerboard": 8, "2spirals": 2}


class _FreshBatches(IterableDataset):
    """``num_batches`` fresh batches a pass from a seeded stream.

    Points are drawn ``chunk`` batches at a time and sliced: one call of the generator per chunk
    instead of per batch (on a 3x256 MLP a per-batch draw costs ~4% of a training step).
    """

    def __init__(
        self, sample: Callable, batch_size: int, num_batches: int, seed: int, chunk: int = 64
    ):
        self.sample, self.batch_size, self.num_batches = sample, batch_size, num_batches
        self.chunk = chunk
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        left = self.num_batches
        while left > 0:
            n = min(self.chunk, left)
            x, y = self.sample(n * self.batch_size, self.generator)
            yield from zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)
            left -= n


class ToyDataModule(FlowDataModule):
    """2D toy data: batches ``(x, y)`` with x (B, 2) float32 and y (B,) long.

    Training draws fresh points every batch (the data are generated, never stored); validation and
    test use fixed seeded sets, and ``reference(n, seed)`` gives fresh data for metrics.

    Args:
        dataset: one of ``moons, circles, 8gaussians, checkerboard, 2spirals, mixture``.
        batch_size: training batch size.
        batches_per_epoch: training batches in one epoch.
        val_size: number of points in the validation (and test) set.
        seed: seed of the training stream; validation and test use their own fixed seeds.
        mixture: settings of the ``mixture`` dataset: ``means`` (list of [x, y]), ``stds`` and
            ``weights``.
        p_uncond: label dropout probability for classifier-free guidance (training batches only).
    """

    def __init__(
        self,
        dataset: str = "moons",
        batch_size: int = 256,
        batches_per_epoch: int = 1000,
        val_size: int = 2000,
        seed: int = 0,
        mixture: dict | None = None,
        p_uncond: float = 0.0,
    ):
        super().__init__()
        choices = [*DATASETS, "mixture"]
        if dataset not in choices:
            raise UsageError(f"unknown dataset {dataset!r}; expected one of {choices}")
        for name, value in (
            ("batch_size", batch_size),
            ("batches_per_epoch", batches_per_epoch),
            ("val_size", val_size),
        ):
            if value < 1:
                raise UsageError(f"data.{name} must be a positive integer, got {value}")
        self.save_hyperparameters()
        if dataset == "mixture":
            mixture = mixture or {"means": [[-2.0, 0.0], [2.0, 0.0]]}
            self.sampler = GaussianMixture(**mixture)
            self.num_classes = len(self.sampler.means)
        else:
            self.sampler = DATASETS[dataset]
            self.num_classes = NUM_CLASSES[dataset]
        LabelDropout(p_uncond, self.num_classes)  # checks p_uncond
        self.p_uncond = float(p_uncond)
        self.data_shape = (2,)

    def class_frequencies(self) -> list[float] | None:
        """The mixture's weights; the named datasets draw every class alike."""
        if isinstance(self.sampler, GaussianMixture):
            return self.sampler.weights.tolist()
        return [1.0 / self.num_classes] * self.num_classes

    def reference(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` fresh data points and labels from a generator seeded with ``seed``."""
        return self.sampler(n, torch.Generator().manual_seed(seed))

    def evaluator(self, options: EvalOptions | None = None) -> PointEvaluator:
        return PointEvaluator(self.reference, self.num_classes)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        # A stream of its own for every epoch and, under DDP, for every rank: Lightning gives an
        # iterable dataset no distributed sampler, and equal seeds would give every rank the same
        # batches. Rank 0 draws what a single-device run draws.
        epoch = self.trainer.current_epoch if self.trainer else 0
        rank = self.trainer.global_rank if self.trainer else 0
        seed = hp.seed + 7919 * epoch + 104_729 * rank
        stream = _FreshBatches(self.sampler, hp.batch_size, hp.batches_per_epoch, seed)
        return DataLoader(stream, batch_size=None)

    def _fixed(self, seed: int) -> DataLoader:
        return DataLoader([self.reference(self.hparams.val_size, seed)], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._fixed(1_000_003)

    def test_dataloader(self) -> DataLoader:
        return self._fixed(2_000_003)
