"""The evaluation protocol: which data each metric compares with, with which seeds and counts.

Every number ``flowdiff evaluate`` prints is defined here, once, and printed with the results, so
that two runs evaluated with the same flowdiff version compare directly:

- **points (2D)**: ``num_samples`` samples against ``num_samples`` fresh data points drawn with the
  fixed seed ``REFERENCE_SEED``: exact W2 (POT) and the unbiased MMD^2 with the sum of RBF kernels
  of bandwidths ``BANDWIDTHS``. Floor: ``num_samples`` other fresh points (``FLOOR_SEED``) against
  the same reference. NLL in nats a point on ``nll_samples`` fresh points (``NLL_SEED``) through the
  ODE with the exact divergence.
- **images (MNIST)**: in the features of flowdiff's own MNIST classifier
  (``flowdiff.metrics.classifier``), ``num_samples`` samples against ``REFERENCE_IMAGES`` training
  images (a seeded subset): Fréchet distance and KID (torchmetrics), precision and recall (k-NN
  manifolds), and the classifier's accuracy on samples drawn for label ``i mod 10``. Floor:
  ``num_samples`` test images against the same reference. Bits per dimension on ``nll_samples``
  test images (a seeded subset), dequantised with seeded noise, through the ODE with Hutchinson's
  estimator (seeded Rademacher probes).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from flowdiff.metrics.report import Column
from flowdiff.utils import UsageError

PROTOCOL_VERSION = 1
REFERENCE_SEED = 1_000_081
FLOOR_SEED = 2_000_081
NLL_SEED = 3_000_081
BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)
# The likelihood ODE's RK4 grid (``flowdiff.likelihood.log_likelihood``): uniform for points;
# for images, steps shrinking towards t = 1 (power 2), where their field is stiff.
NLL_GRID_POWER = {"points": 1.0, "images": 2.0}
REFERENCE_IMAGES = 10_000
CLASSIFIER_MIN_ACCURACY = 0.99


def make_suite(run, plan, cfg):
    """The suite for the run's data; checks every input it will need (no long work)."""
    if len(run.model.data_shape) == 3:
        return ImageSuite(run, plan, cfg)
    return PointSuite(run, plan, cfg)


class _Suite:
    columns: list[Column]

    def __init__(self, run, plan, cfg):
        self.run, self.plan, self.cfg = run, plan, cfg
        self.datamodule = run.datamodule
        self.floor: dict = {}

    def base_protocol(self, plan, ckpt: Path) -> dict:
        return {
            "checkpoint": str(ckpt),
            "protocol": f"flowdiff evaluate v{PROTOCOL_VERSION}",
            "samples a row": plan.num_samples,
            "chunk (samples integrated at once)": plan.batch_size,
            "noise": f"chunk c drawn from seed {self.cfg.seed} * 1000003 + c",
        }

    def likelihood_field(self, model, y: Tensor | None):
        """The field whose likelihood is measured: the unconditional one when the model learned it
        (label dropout), else the field conditioned on the data's labels (``log p(x|y)``)."""
        p_uncond = (self.datamodule.hparams.get("p_uncond", 0.0) if self.datamodule else 0.0) or 0
        if not model.conditional:
            return lambda lo, hi: model.field(), "unconditional"
        if p_uncond > 0:
            null = torch.full((self.plan.nll_samples,), model.net.num_classes)
            return lambda lo, hi: model.field(null[lo:hi].to(model.device)), "unconditional (null)"
        return lambda lo, hi: model.field(y[lo:hi].to(model.device)), "conditional on data labels"

    def integrate(
        self, fabric, model, x: Tensor, field_of, divergence: str, steps: int, grid_power: float
    ) -> Tensor:
        """``log p(x)`` of every row of ``x``, chunked and split across ranks."""
        from flowdiff.evaluate import chunk_generator, map_chunks
        from flowdiff.likelihood import log_likelihood

        def work(c, lo, hi):
            result = log_likelihood(
                field_of(lo, hi),
                x[lo:hi].to(model.device),
                steps=steps,
                divergence=divergence,
                probes=self.cfg.probes,
                generator=chunk_generator(NLL_SEED, c),
                grid_power=grid_power,
            )
            return result.log_prob

        return map_chunks(fabric, len(x), self.plan.batch_size, work, "likelihood").double()


class PointSuite(_Suite):
    columns = [Column("w2", "W2"), Column("mmd", "MMD^2 x 1e3", "{:.3f}", 1e3)]

    def __init__(self, run, plan, cfg):
        super().__init__(run, plan, cfg)
        if self.datamodule is None or not hasattr(self.datamodule, "reference"):
            raise UsageError("this checkpoint names no 2D datamodule to compare samples with")
        n = plan.num_samples
        self.reference, labels = self.datamodule.reference(n, REFERENCE_SEED)
        if plan.labels is not None:  # guided samples follow the data's class frequencies
            plan.labels = labels

    def prepare(self, fabric, log) -> None:
        if fabric.global_rank == 0:
            other, _ = self.datamodule.reference(self.plan.num_samples, FLOOR_SEED)
            self.floor = self.score(other)

    def score(self, samples: Tensor, labels: Tensor | None = None) -> dict:
        from flowdiff.metrics.points import mmd, wasserstein2

        return {
            "w2": wasserstein2(samples, self.reference),
            "mmd": mmd(samples, self.reference, BANDWIDTHS),
        }

    def likelihood(self, fabric, model, cfg, plan) -> dict:
        steps = cfg.nll_steps or 50
        x, y = self.datamodule.reference(plan.nll_samples, NLL_SEED)
        field_of, conditioning = self.likelihood_field(model, y)
        log_p = self.integrate(fabric, model, x, field_of, "exact", steps, NLL_GRID_POWER["points"])
        nll, sem = -log_p.mean().item(), log_p.std().item() / len(log_p) ** 0.5
        return {
            "nll": nll,
            "nll_sem": sem,
            "unit": "nats a point",
            "summary": f"NLL {nll:.4f} ± {sem:.4f} nats a point ({conditioning}; {len(x)} "
            f"fresh points, RK4 {steps} steps, exact divergence)",
        }

    def protocol(self, cfg, plan, ckpt: Path) -> dict:
        return {
            **self.base_protocol(plan, ckpt),
            "reference": f"{plan.num_samples} fresh data points, seed {REFERENCE_SEED}",
            "floor": f"data (seed {FLOOR_SEED})",
            "W2": "exact (POT network simplex)",
            "MMD^2": f"unbiased, sum of RBF kernels, bandwidths {list(BANDWIDTHS)}",
        }


class ImageSuite(_Suite):
    """MNIST metrics in the features of flowdiff's own classifier (see the module docstring)."""

    def __init__(self, run, plan, cfg):
        super().__init__(run, plan, cfg)
        from flowdiff.data.mnist_files import find_or_prepare_mnist

        hparams = self.datamodule.hparams if self.datamodule is not None else {}
        data_dir = cfg.data_dir or hparams.get("data_dir", "data")
        self.raw = find_or_prepare_mnist(data_dir, hparams.get("download", False))
        self.cache = Path(
            cfg.classifier_cache
            or os.environ.get("FLOWDIFF_CACHE")
            or Path.home() / ".cache" / "flowdiff"
        )
        if cfg.inception_weights is not None:
            from flowdiff.metrics.images import check_inception

            check_inception(cfg.inception_weights)
        self.columns = [
            Column("fid", "FID", "{:.3f}"),
            Column("kid_mean", "KID", "{:.3f}"),  # in these features: not ~1e-3
            Column("precision", "precision", "{:.3f}"),
            Column("recall", "recall", "{:.3f}"),
        ]
        if run.model.conditional:
            self.columns.append(Column("class_accuracy", "accuracy", "{:.3f}"))
        if cfg.inception_weights:
            self.columns.append(Column("inception_fid", "Inception FID", "{:.2f}"))

    def _shape(self, images: Tensor) -> Tensor:
        """uint8 (N, 28, 28) to (N, *data_shape), padded as the training data was."""
        import torch.nn.functional as F

        images = images.unsqueeze(1)
        pad = (self.run.model.data_shape[-1] - images.shape[-1]) // 2
        return F.pad(images, (pad,) * 4, value=0) if pad > 0 else images

    def prepare(self, fabric, log) -> None:
        from flowdiff.data.mnist import pixels_to_float
        from flowdiff.data.mnist_files import load_split
        from flowdiff.metrics.classifier import load_or_train_classifier
        from flowdiff.metrics.images import ImageMetrics

        train, test = load_split(self.raw, train=True), load_split(self.raw, train=False)
        self.test = test
        if fabric.global_rank != 0:
            return
        log(f"MNIST feature classifier: cache {self.cache}")
        self.classifier, self.classifier_info = load_or_train_classifier(
            train, test, self.cache, min_accuracy=CLASSIFIER_MIN_ACCURACY, progress=True
        )
        info = self.classifier_info
        state = "trained" if info.trained else "loaded"
        log(f"classifier {state}: {info.path} (test accuracy {info.test_accuracy:.4f})")
        g = torch.Generator().manual_seed(REFERENCE_SEED)
        ref = torch.randperm(len(train[1]), generator=g)[: min(REFERENCE_IMAGES, len(train[1]))]
        self.reference = pixels_to_float(self._shape(train[0][ref]))
        self.metrics = ImageMetrics(self.classifier, self.reference)
        g = torch.Generator().manual_seed(FLOOR_SEED)
        n = min(self.plan.num_samples, len(test[1]))
        pick = torch.randperm(len(test[1]), generator=g)[:n]
        self.floor_images = pixels_to_float(self._shape(test[0][pick]))
        self.floor = self.score(self.floor_images, test[1][pick])

    def score(self, samples: Tensor, labels: Tensor | None = None) -> dict:
        metrics = self.metrics.compare(samples, labels)
        if self.cfg.inception_weights:
            from flowdiff.metrics.images import inception_fid

            metrics["inception_fid"] = inception_fid(
                self.reference, samples, self.cfg.inception_weights
            )
        return metrics

    def likelihood(self, fabric, model, cfg, plan) -> dict:
        from flowdiff.likelihood import bits_per_dim, dequantize

        steps = cfg.nll_steps or 50
        images, labels = self.test
        g = torch.Generator().manual_seed(NLL_SEED)
        pick = torch.randperm(len(labels), generator=g)[: plan.nll_samples]
        pixels = self._shape(images[pick])
        x = dequantize(pixels, torch.Generator().manual_seed(NLL_SEED + 1))
        x = x.contiguous(memory_format=torch.channels_last)
        field_of, conditioning = self.likelihood_field(model, labels[pick])
        power = NLL_GRID_POWER["images"]
        log_p = self.integrate(fabric, model, x, field_of, "hutchinson", steps, power)
        bpd = bits_per_dim(log_p, pixels[0].numel())
        mean, sem = bpd.mean().item(), bpd.std().item() / len(bpd) ** 0.5
        return {
            "bits_per_dim": mean,
            "bits_per_dim_sem": sem,
            "unit": "bits/dim",
            "summary": f"{mean:.4f} ± {sem:.4f} bits/dim ({conditioning}; {len(pick)} test "
            f"images, seed {NLL_SEED}; uniform dequantisation; RK4 {steps} steps on the grid "
            f"t_i = 1 - (1 - t_min) (i/{steps})^{power:g}; Hutchinson, {cfg.probes} Rademacher "
            "probe(s) a sample)",
        }

    def protocol(self, cfg, plan, ckpt: Path) -> dict:
        info = self.classifier_info
        return {
            **self.base_protocol(plan, ckpt),
            "feature network": f"flowdiff MNIST classifier {Path(info.path).name} "
            f"(test accuracy {info.test_accuracy:.4f})",
            "reference": f"{len(self.reference)} training images (seed {REFERENCE_SEED})",
            "floor": f"data ({len(self.floor_images)} test images)",
            "labels": "sample i asks for class i mod 10",
            "metrics": "FID and KID (torchmetrics), precision/recall (k-NN, k=3), accuracy",
        }
