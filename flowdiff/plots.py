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
    # Fixed margins: tight_layout draws the figure once more, a quarter of the picture's cost at
    # every validation of a 2D run (no axis labels here, only ticks and the title).
    fig.subplots_adjust(left=0.08, bottom=0.06, right=0.97, top=0.94)
    return fig


def save_figure(fig: Figure, path) -> None:
    """Write ``fig`` to ``path`` atomically (format from the suffix) and free it."""
    from pathlib import Path

    from flowdiff.utils import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] -> one (C, H', W') grid in [0, 1], ``nrow`` images a row."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    return (grid + 1) / 2


MAX_COLUMNS = 16  # images a row: a label with more samples wraps onto more rows


def labelled_grid(
    images: Tensor,
    labels: Tensor | None = None,
    names: list[str] | None = None,
    max_columns: int = MAX_COLUMNS,
) -> tuple[Tensor, list[tuple[float, str]]]:
    """Images (N, C, H, W) in [-1, 1] as one grid in [0, 1], and ``(y, name)`` row labels (y in
    grid pixels).

    Without labels the grid is about square (at most ``max_columns`` wide). With labels each
    class starts a new row, in the order the labels first appear, wrapped at ``max_columns``
    (the rest of its last row left white) and named (``names[k]``, else ``k``) at its first row.
    """  # fmt: skip
    import math

    import torch

    images = images.float().cpu().clamp(-1, 1)
    if labels is None:
        columns = max(1, min(max_columns, math.ceil(math.sqrt(len(images)))))
        return image_grid(images, columns), []
    labels = labels.cpu()
    classes = list(dict.fromkeys(labels.tolist()))  # in the order asked
    columns = max(1, min(max_columns, max(int((labels == k).sum()) for k in classes)))
    pitch, height = images.shape[-2] + 2, images.shape[-2]  # make_grid pads 2 pixels
    blocks, rows, row = [], [], 0
    for k in classes:
        block = images[labels == k]
        blocks += [block, torch.ones(-len(block) % columns, *block.shape[1:])]
        name = names[k] if names and 0 <= k < len(names) else str(k)
        rows.append((2 + row * pitch + height / 2, name))
        row += math.ceil(len(block) / columns)
    return image_grid(torch.cat(blocks), columns), rows


def plot_image_grids(grids: dict[str, tuple[Tensor, list]], title: str = "") -> Figure:
    """Grids side by side, one panel each, titled by their keys (e.g. ``w = 3``), their rows
    labelled (:func:`labelled_grid`). The figure is sized by the grids: small ones magnified up
    to 4x, large ones a pixel a pixel, so that every image stays readable."""
    first, names = next(iter(grids.values()))
    height, width = first.shape[-2:]
    dpi, zoom = 100, max(1.0, min(4.0, 800 / max(height, width)))
    w, h = width * zoom / dpi, height * zoom / dpi  # inches a panel
    # Inches left of each panel, for the row names (class names, prompts): ~0.07 a character.
    margin = max([0.9] + [0.15 + 0.07 * len(text) for _, text in names]) if names else 0.1
    top, bottom = (0.8 if title else 0.4), 0.1
    fig_w, fig_h = len(grids) * (w + margin) + 0.1, h + top + bottom
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    for i, (name, (grid, rows)) in enumerate(grids.items()):
        left = i * (w + margin) + margin
        ax = fig.add_axes((left / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
        image = grid.permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
        for y, text in rows:
            ax.text(-4, y, text, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, y=1 - 0.25 / fig_h, va="top")
    return fig


def plot_labelled_points(
    panels: dict[str, tuple[Tensor, Tensor]], data: Tensor | None = None, title: str = ""
) -> Figure:
    """2D samples coloured by the label they were drawn for, one panel per guidance scale."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.7), dpi=100, squeeze=False)
    for ax, (name, (points, labels)) in zip(axes[0], panels.items(), strict=True):
        if data is not None:
            ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgrey", rasterized=True)
        p = points.float().cpu()
        ax.scatter(
            p[:, 0], p[:, 1], s=2, c=labels.cpu(), cmap="tab10", vmin=0, vmax=9, rasterized=True
        )
        ax.set(title=name, aspect="equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
