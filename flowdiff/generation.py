"""Sampling from a trained :class:`flowdiff.module.FlowModule`: the network as a guided field,
prompts encoded, the initial noise, and the integration in chunks."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from flowdiff.fields import ModelField
from flowdiff.samplers import Sampler, SampleResult
from flowdiff.text import TextCondition
from flowdiff.utils import UsageError


class Generation:
    """The sampling half of :class:`flowdiff.module.FlowModule` (a mixin: it uses the module's
    ``net``, ``path``, ``objective``, ``sampler``, ``text_encoder``, ``inference``,
    ``data_shape``, ``memory_format``, ``device`` and ``dtype``)."""

    def field(
        self,
        y: Tensor | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> ModelField:
        """The network as a field for the samplers, guided when labels and a scale are given
        (only for ``a <= t <= b`` with a ``guidance_interval``)."""
        null = getattr(self.net, "num_classes", 0) if self.conditional else None
        prediction = self.objective.prediction
        net = self.inference if self.inference is not None else self.net
        return ModelField(net, self.path, prediction, y, guidance, null, guidance_interval)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], per_prompt: int) -> tuple[TextCondition, Tensor]:
        """The condition of ``per_prompt`` samples of each prompt, prompt after prompt, and the
        index of each sample's prompt (a text model only)."""
        if self.text_encoder is None:
            raise UsageError("prompts need a model trained on captions; this one has no text")
        condition = self.text_encoder(list(prompts)).repeat_interleave(per_prompt)
        return condition, torch.arange(len(prompts)).repeat_interleave(per_prompt)

    def noise(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``x_0 ~ N(0, I)`` (num_samples, *data_shape), drawn on the CPU (the same numbers
        whatever the device) and moved to the model's device."""
        x_0 = torch.randn(num_samples, *self.data_shape, generator=generator, device="cpu")
        return x_0.to(self.device, self.dtype)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: Sampler | None = None,
        y: Tensor | TextCondition | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        batch_size: int | None = None,
        progress: bool = False,
        guidance_interval: tuple[float, float] | None = None,
        x_0: Tensor | None = None,
    ) -> SampleResult:
        """Integrate from ``x_0 ~ N(0, I)`` (:meth:`noise`, or the ``x_0`` given) at ``t_min`` to
        t = 1 with ``sampler``.

        ``batch_size`` splits the work into chunks (the noise is drawn at once, so the samples do
        not depend on it): a CPU runs a small U-Net ~2x faster on batches of ~250 images than on
        batches of 2,000, whose activations no longer fit in its caches. ``progress`` shows a
        progress bar over the chunks when stderr is a terminal. The NFE is the largest any chunk
        used (an adaptive solver may use different counts).
        """
        sampler = sampler or self.sampler
        x_0 = self.noise(num_samples, generator) if x_0 is None else x_0.to(self.device, self.dtype)
        x_0 = x_0.contiguous(memory_format=self.memory_format)
        size = batch_size or num_samples
        results = []
        starts = range(0, num_samples, size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch", disable=not sys.stderr.isatty())
        for start in starts:
            y_chunk = y[start : start + size] if y is not None else None
            field = self.field(y_chunk, guidance, guidance_interval)
            x = x_0[start : start + size]
            results.append(
                sampler.sample(field, x, self.path.t_min, 1.0, return_trajectory, generator)
            )
        if len(results) == 1:
            return results[0]
        trajectory = None
        if return_trajectory:
            trajectory = torch.cat([r.trajectory for r in results], dim=1)
        nfe = max(r.nfe for r in results)
        return SampleResult(torch.cat([r.x for r in results]), trajectory, nfe)
