"""Pictures of samples: 2D scatter plots with trajectories."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_points(
    samples: Tensor,
    data: Tensor | None = None,
    trajectory: Tensor | None = None,
    title: str = "",
    num_trajectories: int = 48,
) -> Figure:
    """Samples (N, 2) over data (M, 2), with the paths of a few points from t = 0 to t = 1.

    ``trajectory`` is (steps + 1, N, 2); the first ``num_trajectories`` points are drawn as lines
    from their noise (grey dot) to their sample.
    """
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if data is not None:
        d = data.cpu()
        ax.scatter(d[:, 0], d[:, 1], s=2, c="tab:blue", alpha=0.25, label="data", rasterized=True)
    s = samples.cpu()
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:orange", alpha=0.5, label="samples", rasterized=True)
    if trajectory is not None:
        tr = trajectory[:, :num_trajectories].cpu()
        ax.plot(tr[:, :, 0], tr[:, :, 1], lw=0.6, c="black", alpha=0.6)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, c="grey", zorder=3)
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, c="black", zorder=3)
    lim = float(max(s.abs().quantile(0.995), 1.0)) * 1.1
    if data is not None:
        lim = max(lim, float(data.abs().max()) * 1.1)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path) -> None:
    fig.savefig(path)
    plt.close(fig)
