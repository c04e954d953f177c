"""The result of ``flowdiff evaluate``: a printed table, ``metrics.json``, plots and a W&B log."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flowdiff.data.evaluators import Column
from flowdiff.utils import atomic_path


@dataclass
class Row:
    """One sampler x guidance configuration and its metrics. ``sampler`` is the sampler's repr
    (all its arguments), ``name`` its short name, ``steps`` its step count (None: adaptive)."""

    sampler: str
    name: str
    steps: int | None
    guidance: float | None
    nfe: int
    seconds: float
    metrics: dict


@dataclass
class Report:
    """Protocol, rows, the data floor (metrics of data against data) and the likelihood."""

    protocol: dict
    columns: list[Column]
    rows: list[Row]
    floor: dict
    likelihood: dict | None

    @property
    def primary(self) -> Column:
        return self.columns[0]

    def table(self) -> str:
        head = ["sampler", "steps", "w", "NFE", "time (s)", *(c.header for c in self.columns)]
        body = [
            [
                r.name,
                "-" if r.steps is None else str(r.steps),
                "-" if r.guidance is None else f"{r.guidance:g}",
                str(r.nfe),
                f"{r.seconds:.1f}",
                *(c.cell(r.metrics) for c in self.columns),
            ]
            for r in self.rows
        ]
        body.append([self.protocol.get("floor", "data floor"), "", "", "", ""])
        body[-1] += [c.cell(self.floor) for c in self.columns]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

        def fmt(line):
            return "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()

        lines = ["protocol:"]
        lines += [f"  {key}: {value}" for key, value in self.protocol.items()]
        lines += ["", fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        if self.likelihood:
            lines += ["", f"likelihood: {self.likelihood['summary']}"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "rows": [asdict(r) for r in self.rows],
            "floor": self.floor,
            "likelihood": self.likelihood,
        }

    def write(self, out: Path) -> None:
        """``metrics.json`` and the two plots, each written atomically."""
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        from flowdiff.plots import save_figure

        for name, fig in self.figures().items():
            save_figure(fig, out / f"{name}.png")

    def figures(self) -> dict:
        """Quality against NFE (a line per sampler and scale) and against guidance (a line per
        sampler and step count), with the data floor dashed."""
        import matplotlib.pyplot as plt

        metric = self.primary
        panels = [metric] + [c for c in self.columns if c.key == "class_accuracy"]
        figures = {}
        for name, x_of, group_of, x_label in (
            ("quality_vs_nfe", lambda r: r.nfe, lambda r: (r.name, r.guidance), "NFE"),
            (
                "quality_vs_guidance",
                lambda r: r.guidance,
                lambda r: (r.name, r.steps),
                "guidance scale w",
            ),
        ):
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100)
            axes = [axes] if len(panels) == 1 else list(axes)
            for ax, column in zip(axes, panels, strict=True):
                groups: dict = {}
                for r in self.rows:
                    if x_of(r) is not None and r.metrics.get(column.key) is not None:
                        groups.setdefault(group_of(r), []).append(r)
                for key, rows in groups.items():
                    rows = sorted(rows, key=x_of)
                    xs = [x_of(r) for r in rows]
                    ys = [r.metrics[column.key] * column.scale for r in rows]
                    ax.plot(xs, ys, marker="o", label=_label(key, name))
                if self.floor.get(column.key) is not None:
                    floor = self.floor[column.key] * column.scale
                    ax.axhline(floor, ls="--", c="grey", label="data floor")
                if name == "quality_vs_nfe":
                    ax.set_xscale("log")
                ax.set(xlabel=x_label, ylabel=column.header)
                ax.grid(alpha=0.3)
                if groups:
                    ax.legend(fontsize=8)
                else:
                    ax.text(0.5, 0.5, "no rows with this axis", ha="center", transform=ax.transAxes)
            fig.suptitle(self.protocol.get("checkpoint", ""), fontsize=9)
            fig.tight_layout()
            figures[name] = fig
        return figures

    def log_wandb(self, out: Path, run_name: str) -> None:
        """The table, the floor, the likelihood and the plots as one W&B run (job_type
        ``evaluate``) under ``out``: online with credentials, offline otherwise."""
        import wandb

        from flowdiff.wandb_mode import choose_wandb_mode

        choose_wandb_mode()
        os.environ.setdefault("WANDB_SILENT", "true")  # flowdiff prints the one line that matters
        run = wandb.init(
            project="flowdiff",
            dir=str(out),
            name=f"{run_name}-evaluate",
            job_type="evaluate",
            config=self.protocol,
            reinit="finish_previous",
        )
        keys = ["sampler", "name", "steps", "guidance", "nfe", "seconds"]
        keys += [c.key for c in self.columns]
        data = [
            [r.sampler, r.name, r.steps, r.guidance, r.nfe, r.seconds]
            + [r.metrics.get(c.key) for c in self.columns]
            for r in self.rows
        ]
        logged = {"evaluate/table": wandb.Table(columns=keys, data=data)}
        for name in ("quality_vs_nfe", "quality_vs_guidance"):
            logged[f"evaluate/{name}"] = wandb.Image(str(out / f"{name}.png"))
        run.log(logged)
        for prefix, values in (("floor", self.floor), ("likelihood", self.likelihood or {})):
            run.summary.update({f"{prefix}/{k}": v for k, v in values.items() if _scalar(v)})
        run_dir = os.path.dirname(run.dir.rstrip("/")) if run.dir else None
        run.finish()
        if os.environ.get("WANDB_MODE") == "offline" and run_dir:
            print(f"flowdiff: W&B run saved offline; upload it with: wandb sync {run_dir}")


def _label(key: tuple, figure: str) -> str:
    sampler, second = key
    if figure == "quality_vs_nfe":
        return sampler if second is None else f"{sampler}, w = {second:g}"
    return f"{sampler}, {second} steps"


def _scalar(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
