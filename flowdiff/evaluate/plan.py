"""What a run of ``flowdiff evaluate`` will do, checked before any long work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowdiff.flags import check_guidance, check_interval_use, check_samplers, parse_intervals
from flowdiff.samplers import FixedGridSampler, Sampler, parse_grid, sampler_class, with_args
from flowdiff.utils import UsageError

OUTPUTS = ("metrics.json", "quality_vs_nfe.png", "quality_vs_guidance.png")


@dataclass
class Plan:
    samplers: list[Sampler]
    guidance: list[float | None]
    intervals: list[tuple[float, float] | None]
    num_samples: int
    batch_size: int
    nll_samples: int
    nll_steps: int
    out: Path
    labels: torch.Tensor | None = field(default=None, repr=False)
    prompts: list[str] | None = field(default=None, repr=False)  # a text model's; labels index it

    def condition(self, model, lo: int, hi: int):
        """The condition of samples ``lo:hi``: their labels, or their prompts encoded."""
        if self.prompts is None:
            return self.labels[lo:hi].to(model.device)
        with torch.no_grad():
            return model.text_encoder([self.prompts[i] for i in self.labels[lo:hi].tolist()])

    @property
    def rows(self) -> list[tuple[Sampler, float | None, tuple[float, float] | None]]:
        """sampler x guidance x interval; a scale of 1 (or none) guides nothing, so it gets one
        row without an interval."""
        rows = []
        for s in self.samplers:
            for w in self.guidance:
                unguided = w is None or w == 1.0
                rows += [(s, w, None)] if unguided else [(s, w, iv) for iv in self.intervals]
        return rows


def make_samplers(cfg, model) -> list[Sampler]:
    """Fixed-grid samplers x ``--steps`` x ``--grid``; adaptive ones x ``--atol`` x ``--rtol``.
    Flags that no sampler of the sweep takes are refused."""
    grids = [parse_grid(g) for g in cfg.grid] if cfg.grid else [None]
    atols, rtols = cfg.atol or [None], cfg.rtol or [None]
    samplers, kinds = [], set()
    for name in cfg.sampler or [None]:
        cls = type(model.sampler) if name is None else sampler_class(name)
        if issubclass(cls, FixedGridSampler):
            kinds.add("fixed")
            samplers += [
                with_args(model.sampler, name, steps=n, grid=g)
                for n in cfg.steps or [None]
                for g in grids
            ]
        else:
            kinds.add("adaptive")
            samplers += [
                with_args(model.sampler, name, atol=a, rtol=r) for a in atols for r in rtols
            ]
    if (cfg.steps or cfg.grid) and "fixed" not in kinds:
        raise UsageError(
            "--steps and --grid apply to fixed-grid samplers, and this sweep has only adaptive "
            "ones (their steps follow --atol and --rtol)"
        )
    if (cfg.atol or cfg.rtol) and "adaptive" not in kinds:
        raise UsageError("--atol and --rtol apply to adaptive samplers (--sampler dopri5)")
    return samplers


def make_plan(cfg, model, evaluator, run_dir: Path) -> Plan:
    """Every sampler (the checkpoint's own, with ``--sampler``/``--steps``/``--grid``/``--atol``
    /``--rtol`` overriding it), the guidance scales and intervals, the counts and the output; each
    problem is a UsageError now."""
    samplers = make_samplers(cfg, model)
    check_samplers(model, samplers)
    intervals = parse_intervals(cfg.guidance_interval)
    if cfg.guidance is not None:
        check_guidance(model, cfg.guidance)
        guidance: list[float | None] = list(cfg.guidance)
    elif model.conditional:
        guidance = [1.0, 3.0] if model.p_uncond > 0 else [1.0]
    else:
        guidance = [None]
    check_interval_use(intervals, any(w is not None and w != 1.0 for w in guidance))
    num_samples = cfg.num_samples or evaluator.num_samples
    labels = evaluator.labels(num_samples) if model.conditional else None
    prompts = evaluator.prompts(num_samples) if model.reads_text else None
    out = Path(cfg.out) if cfg.out else run_dir / "eval" / f"seed{cfg.seed}"
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite true or choose --out DIR")
    return Plan(
        samplers,
        guidance,
        intervals or [None],
        num_samples,
        cfg.batch_size or evaluator.chunk_size,
        cfg.nll_samples or evaluator.nll_samples,
        cfg.nll_steps or 50,
        out,
        labels,
        prompts,
    )
