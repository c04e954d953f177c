"""Metrics comparing samples with data."""

from flowdiff.metrics.points import mmd, wasserstein2

__all__ = ["mmd", "wasserstein2"]
