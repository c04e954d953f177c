"""The result of ``flowdiff evaluate``: a printed table, ``metrics.json``, plots and a W&B log."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flowdiff.data.evaluators import Column
from flowdiff.utils import UsageError, atomic_path

LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class Row:
    """One sampler x guidance configuration and its metrics. ``sampler`` is the sampler's repr
    (all its arguments), ``name`` its short name, ``steps`` its step count and ``grid`` its time
    grid (``edm:7``; both None: adaptive, whose ``atol``/``rtol`` are set instead), and
    ``guidance_interval`` the times ``[a, b]`` guidance was limited to."""

    sampler: str
    name: str
    steps: int | None
    guidance: float | None
    nfe: int
    seconds: float
    metrics: dict
    grid: str | None = None
    atol: float | None = None
    rtol: float | None = None
    guidance_interval: list[float] | None = None

    @classmethod
    def of(cls, sampler, guidance, interval, nfe: int, seconds: float, metrics: dict) -> Row:
        grid = getattr(sampler, "grid", None)
        return cls(
            repr(sampler),
            sampler.short_name,
            getattr(sampler, "steps", None),
            guidance,
            nfe,
            seconds,
            metrics,
            grid.label if grid is not None else None,
            getattr(sampler, "atol", None),
            getattr(sampler, "rtol", None),
            list(interval) if interval is not None else None,
        )

    @property
    def setting(self) -> str:
        """The sampler with its tolerances: ``dopri5 (tol 1e-05)``, ``dopri5 (atol 1e-05, rtol
        0.001)``, or its short name."""
        if self.atol is None or self.rtol is None:
            return self.name
        if self.atol == self.rtol:
            return f"{self.name} (tol {self.atol:g})"
        return f"{self.name} (atol {self.atol:g}, rtol {self.rtol:g})"

    @property
    def interval(self) -> str:
        if self.guidance_interval is None:
            return "-"
        return "{:g}-{:g}".format(*self.guidance_interval)


@dataclass
class Report:
    """Protocol, rows, the data floor (metrics of data against data) and the likelihood."""

    protocol: dict
    columns: list[Column]
    rows: list[Row]
    floor: dict
    likelihood: dict | None
    straightness: dict | None = None

    @property
    def primary(self) -> Column:
        return self.columns[0]

    def table(self) -> str:
        """The rows as text; a ``grid`` column when a grid other than uniform was used, and a
        ``t interval`` column when guidance was limited to one."""
        grids = any(r.grid not in (None, "uniform") for r in self.rows)
        intervals = any(r.guidance_interval is not None for r in self.rows)
        head = ["sampler", "steps", *(["grid"] if grids else []), "w"]
        head += [*(["t interval"] if intervals else []), "NFE", "time (s)"]
        head += [c.header for c in self.columns]
        body = []
        for r in self.rows:
            line = [r.setting, "-" if r.steps is None else str(r.steps)]
            line += [r.grid or "-"] if grids else []
            line += ["-" if r.guidance is None else f"{r.guidance:g}"]
            line += [r.interval] if intervals else []
            line += [str(r.nfe), f"{r.seconds:.1f}", *(c.cell(r.metrics) for c in self.columns)]
            body.append(line)
        floor = [c.cell(self.floor) for c in self.columns]
        blank = [""] * (len(head) - 1 - len(floor))
        body.append([self.protocol.get("floor", "data floor"), *blank, *floor])
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

        def fmt(line):
            return "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()

        lines = ["protocol:"]
        lines += [f"  {key}: {value}" for key, value in self.protocol.items()]
        lines += ["", fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        if self.likelihood:
            lines += ["", f"likelihood: {self.likelihood['summary']}"]
        if self.straightness:
            lines += [f"straightness: {self.straightness['summary']}"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "rows": [asdict(r) for r in self.rows],
            "floor": self.floor,
            "likelihood": self.likelihood,
            "straightness": self.straightness,
        }

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """The report an earlier evaluation wrote (``metrics.json`` or its folder); its columns
        are left to the report it is drawn beside."""
        path = Path(path)
        path = path / "metrics.json" if path.is_dir() else path
        try:
            d = json.loads(path.read_text())
            rows = [Row(**r) for r in d["rows"]]
            report = cls(d["protocol"], [], rows, d["floor"], d.get("likelihood"))
            report.protocol["checkpoint"]  # noqa: B018 (every evaluation records it)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise UsageError(f"--compare: {str(path)!r} is not a metrics.json of flowdiff "
                             f"evaluate ({type(err).__name__}: {err})") from err  # fmt: skip
        return report

    @property
    def run_name(self) -> str:
        """The run directory's name (``runs/toy-ot/checkpoints/last.ckpt``: ``toy-ot``)."""
        ckpt = Path(self.protocol["checkpoint"])
        return ckpt.parent.parent.name or ckpt.stem

    def differences(self, protocol: dict) -> list[str]:
        """The protocol entries where ``protocol`` differs, other than the checkpoint and the
        network's precision (what a comparison is often for)."""
        keys = (set(protocol) | set(self.protocol)) - {"checkpoint", "network precision"}
        return sorted(k for k in keys if self.protocol.get(k) != protocol.get(k))

    def check_comparable(self, protocol: dict) -> None:
        """Refuse an earlier evaluation whose protocol differs in the entries of ``protocol``."""
        differ = [k for k in self.differences(protocol) if k in protocol]
        if differ:
            raise UsageError(f"--compare: the evaluation of {self.protocol['checkpoint']} used "
                             f"another protocol ({', '.join(differ)} differ)")  # fmt: skip

    def comparable(self, others: list[Report], say=print) -> list[Report]:
        """Those of ``others`` evaluated with this report's whole protocol (and data floor);
        a line for each one left out."""
        kept = []
        for other in others:
            differ = other.differences(self.protocol)
            if other.floor != self.floor:
                differ.append("data floor")
            if differ:
                say(f"flowdiff: {other.run_name} is not drawn beside this evaluation: "
                    f"{', '.join(differ)} differ")  # fmt: skip
            else:
                kept.append(other)
        return kept

    def write(self, out: Path, compared: list[Report] = ()) -> None:
        """``metrics.json`` and the two plots, each written atomically; the runs ``compared``
        are drawn beside this one in the quality-against-NFE plot."""
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        from flowdiff.plots import save_figure

        for name, fig in self.figures(compared).items():
            save_figure(fig, out / f"{name}.png")

    def figures(self, compared: list[Report] = ()) -> dict:
        """Quality against NFE (a line per sampler and scale) and against guidance (a line per
        sampler and step count), with the data floor dashed; none when the data has no sample
        metric (unlabelled images without Inception weights: bits/dim alone). The runs
        ``compared`` join the NFE plot: a colour per sampler setting, a line style per run."""
        import matplotlib.pyplot as plt

        if not self.columns:
            return {}
        metric = self.primary
        panels = [metric] + [c for c in self.columns if c.key == "class_accuracy"]
        figures = {}
        for name, x_of, group_of, x_label in (
            ("quality_vs_nfe", lambda r: r.nfe, _nfe_group, "NFE"),
            ("quality_vs_guidance", lambda r: r.guidance, _guidance_group, "guidance scale w"),
        ):
            reports = [self, *compared] if name == "quality_vs_nfe" else [self]
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100)
            if len(reports) > 1:
                fig.set_size_inches(7 * len(panels), 5)
            axes = [axes] if len(panels) == 1 else list(axes)
            for ax, column in zip(axes, panels, strict=True):
                colours: dict = {}
                for i, report in enumerate(reports):
                    groups: dict = {}
                    for r in report.rows:
                        if x_of(r) is not None and r.metrics.get(column.key) is not None:
                            groups.setdefault(group_of(r), []).append(r)
                    for key, rows in groups.items():
                        rows = sorted(rows, key=x_of)
                        xs = [x_of(r) for r in rows]
                        ys = [r.metrics[column.key] * column.scale for r in rows]
                        colour = colours.setdefault(key, f"C{len(colours) % 10}")
                        label = _label(key)
                        label = f"{report.run_name}: {label}" if len(reports) > 1 else label
                        style = LINE_STYLES[i % len(LINE_STYLES)]
                        ax.plot(xs, ys, style, marker="o", ms=3, c=colour, label=label)
                if self.floor.get(column.key) is not None:
                    floor = self.floor[column.key] * column.scale
                    ax.axhline(floor, lw=3, c="grey", alpha=0.5, label="data floor")
                if name == "quality_vs_nfe":
                    ax.set_xscale("log")
                ax.set(xlabel=x_label, ylabel=column.header)
                ax.grid(alpha=0.3)
                if colours:
                    ax.legend(fontsize=8 if len(reports) == 1 else 6)
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
        keys = ["sampler", "name", "steps", "grid", "guidance", "guidance_interval", "nfe"]
        keys += ["seconds", *(c.key for c in self.columns)]
        data = [
            [r.sampler, r.name, r.steps, r.grid, r.guidance, r.interval, r.nfe, r.seconds]
            + [r.metrics.get(c.key) for c in self.columns]
            for r in self.rows
        ]
        logged = {"evaluate/table": wandb.Table(columns=keys, data=data)}
        for name in ("quality_vs_nfe", "quality_vs_guidance") if self.columns else ():
            logged[f"evaluate/{name}"] = wandb.Image(str(out / f"{name}.png"))
        run.log(logged)
        for prefix, values in (
            ("floor", self.floor),
            ("likelihood", self.likelihood or {}),
            ("straightness", self.straightness or {}),
        ):
            run.summary.update({f"{prefix}/{k}": v for k, v in values.items() if _scalar(v)})
        run_dir = os.path.dirname(run.dir.rstrip("/")) if run.dir else None
        run.finish()
        if os.environ.get("WANDB_MODE") == "offline" and run_dir:
            print(f"flowdiff: W&B run saved offline; upload it with: wandb sync {run_dir}")


def _nfe_group(r: Row) -> tuple:
    """A line of quality against NFE: steps (or tolerances) vary along it."""
    w = None if r.guidance is None else f"w = {r.guidance:g}"
    interval = None if r.guidance_interval is None else f"t in [{r.interval.replace('-', ', ')}]"
    return (r.name, _grid(r), w, interval)


def _guidance_group(r: Row) -> tuple:
    """A line of quality against guidance: the scale varies along it."""
    steps = f"{r.steps} steps" if r.steps is not None else r.setting.partition(" ")[2] or None
    interval = None if r.guidance_interval is None else f"t in [{r.interval.replace('-', ', ')}]"
    return (r.name, steps, _grid(r), interval)


def _grid(r: Row) -> str | None:
    return None if r.grid in (None, "uniform") else f"{r.grid} grid"


def _label(key: tuple) -> str:
    return ", ".join(part for part in key if part)


def _scalar(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
