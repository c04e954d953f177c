"""What a run of ``flowdiff evaluate`` will do, checked before any long work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowdiff.flags import check_guidance
from flowdiff.samplers import Sampler, with_args
from flowdiff.utils import UsageError

OUTPUTS = ("metrics.json", "quality_vs_nfe.png", "quality_vs_guidance.png")


@dataclass
class Plan:
    samplers: list[Sampler]
    guidance: list[float | None]
    num_samples: int
    batch_size: int
    nll_samples: int
    nll_steps: int
    out: Path
    labels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rows(self) -> list[tuple[Sampler, float | None]]:
        return [(s, w) for s in self.samplers for w in self.guidance]


def make_plan(cfg, model, evaluator, run_dir: Path) -> Plan:
    """Every sampler (the checkpoint's own, with ``--sampler``/``--steps`` overriding it), the
    guidance scales, the counts and the output; each problem is a UsageError now."""
    names = cfg.sampler or [None]
    steps = cfg.steps or [None]
    samplers = [with_args(model.sampler, name, steps=n) for name in names for n in steps]
    if cfg.guidance is not None:
        check_guidance(model, cfg.guidance)
        guidance: list[float | None] = list(cfg.guidance)
    elif model.conditional:
        guidance = [1.0, 3.0] if model.p_uncond > 0 else [1.0]
    else:
        guidance = [None]
    num_samples = cfg.num_samples or evaluator.num_samples
    labels = evaluator.labels(num_samples) if model.conditional else None
    out = Path(cfg.out) if cfg.out else run_dir / "eval" / f"seed{cfg.seed}"
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite true or choose --out DIR")
    return Plan(
        samplers,
        guidance,
        num_samples,
        cfg.batch_size or evaluator.chunk_size,
        cfg.nll_samples or evaluator.nll_samples,
        cfg.nll_steps or 50,
        out,
        labels,
    )
