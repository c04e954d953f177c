"""Shared pieces of flowdiff's own commands (``sample``, ``evaluate``): typed list flags written
with commas, the guidance checks both make before any work, and the parsing of ``--grid`` and
``--guidance-interval``."""

from __future__ import annotations

from flowdiff.utils import UsageError


def plain(values: list | None, kind: type) -> list | None:
    """jsonargparse's restricted numbers (PositiveInt, NonNegativeFloat...) as plain ones: they
    go into files that are read with weights_only=True."""
    return None if values is None else [kind(v) for v in values]


def comma_lists(argv: list[str], flags: set[str]) -> list[str]:
    """``--steps 10,20,50`` as ``--steps [10,20,50]``, so a flag typed ``list[PositiveInt]`` takes
    the comma form too (and jsonargparse checks every element)."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if eq and name in flags and not value.lstrip().startswith("["):
            out[i] = f"{name}=[{value}]"
        elif arg in flags and i + 1 < len(out) and not out[i + 1].lstrip().startswith("["):
            out[i + 1] = f"[{out[i + 1]}]"
    return out


def check_guidance(model, scales: list[float] | None, labels: list[int] | None = None) -> None:
    """Refuse guidance or labels the model cannot honour, in one line each."""
    if scales is None and labels is None:
        return
    if not model.conditional:
        raise UsageError(
            "this model was trained without labels: --guidance and --labels need a model "
            "whose network has a label embedding (num_classes > 0)"
        )
    if scales is not None and any(w != 1.0 for w in scales) and not model.p_uncond > 0:
        raise UsageError(
            f"guidance w != 1 needs the unconditional field, and this model never learned it "
            f"(trained with p_uncond = {model.p_uncond}: no label dropout); use --guidance 1, "
            "or train with --data.init_args.p_uncond 0.1"
        )
    k = model.net.num_classes
    bad = [y for y in labels or [] if not 0 <= y < k]
    if bad:
        raise UsageError(f"labels {bad} are outside the model's classes 0..{k - 1}")


def check_samplers(model, samplers: list) -> None:
    """Refuse a sampler that needs an average velocity (``meanflow``) for a model without one."""
    for sampler in samplers:
        if sampler.needs_average_velocity and not model.interval:
            raise UsageError(
                f"sampler {sampler.short_name!r} needs an average-velocity model (trained with "
                "the MeanFlow objective and model.net.init_args.interval true); this model "
                "predicts a velocity only: use euler, heun, ..."
            )


def resolve_labels(values: list[str] | None, class_names: list[str] | None) -> list[int] | None:
    """``--labels`` given as class names (``cat,dog``) or indices (``0,3``), as indices."""
    if values is None:
        return None
    names = list(class_names or [])
    out = []
    for value in values:
        value = str(value).strip()
        if value in names:
            out.append(names.index(value))
        elif value.isdigit():
            out.append(int(value))
        else:
            known = f" ({', '.join(names)})" if names else ""
            raise UsageError(f"--labels: {value!r} is not a class of this model{known}")
    return out


def parse_intervals(values: list[str] | str | None) -> list[tuple[float, float]] | None:
    """``--guidance-interval 0.2,0.8`` (one or several, space-separated) as ``[(0.2, 0.8)]``."""
    from flowdiff.fields import check_interval

    if values is None:
        return None
    values = [values] if isinstance(values, str) else values
    intervals = []
    for text in values:
        parts = str(text).split(",")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 2:
            raise UsageError(f"--guidance-interval takes a,b (e.g. 0.2,0.8), got {text!r}")
        intervals.append(check_interval(numbers))
    return intervals


def check_interval_use(intervals: list | None, guided: bool) -> None:
    """A guidance interval limits guidance: without guided sampling it means nothing."""
    if intervals is not None and not guided:
        raise UsageError(
            "--guidance-interval limits classifier-free guidance: it needs a conditional model "
            "sampled with --guidance"
        )
