"""Schedules ``alpha_t, beta_t`` of the Gaussian probability path, with exact time derivatives.

``alpha_0 = 0, beta_0 = 1`` (noise) and ``alpha_1 = 1, beta_1 = 0`` (data); see MATH.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowdiff.config import Recorded, resolve


@dataclass
class ScheduleOutput:
    """``alpha_t, beta_t`` and their time derivatives, each shaped like the ``t`` that made them."""

    alpha_t: Tensor
    beta_t: Tensor
    d_alpha_t: Tensor
    d_beta_t: Tensor


class Schedule(Recorded):
    """Base class: ``schedule(t) -> ScheduleOutput``. Choose one by ``class_path`` in YAML, by
    class name, or by its alias (:data:`SCHEDULES`: ``linear``, ``sqrt``, ``cosine``)."""

    name: str = ""

    def __call__(self, t: Tensor) -> ScheduleOutput:
        raise NotImplementedError

    def beta_d_beta(self, t: Tensor) -> Tensor:
        """``beta_t d_beta_t = 1/2 d(beta_t^2)/dt``, finite on all of [0, 1]."""
        c = self(t)
        return c.beta_t * c.d_beta_t

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """CondOT path: ``alpha_t = t``, ``beta_t = 1 - t``."""

    name = "linear"

    def __call__(self, t: Tensor) -> ScheduleOutput:
        return ScheduleOutput(t, 1 - t, torch.ones_like(t), -torch.ones_like(t))


class SqrtBetaSchedule(Schedule):
    """The course's path: ``alpha_t = t``, ``beta_t = sqrt(1 - t)``.

    ``d_beta_t = -1 / (2 sqrt(1 - t))`` is infinite at t = 1: callers keep ``t <= t_max < 1``.
    """

    name = "sqrt"

    def __call__(self, t: Tensor) -> ScheduleOutput:
        beta_t = torch.sqrt(1 - t)
        return ScheduleOutput(t, beta_t, torch.ones_like(t), -0.5 / beta_t)

    def beta_d_beta(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -0.5)  # the product of sqrt(1 - t) and -1 / (2 sqrt(1 - t))


class CosineSchedule(Schedule):
    """``alpha_t = sin(pi t / 2)``, ``beta_t = cos(pi t / 2)``."""

    name = "cosine"

    def __call__(self, t: Tensor) -> ScheduleOutput:
        angle = 0.5 * math.pi * t
        sin, cos = torch.sin(angle), torch.cos(angle)
        return ScheduleOutput(sin, cos, 0.5 * math.pi * cos, -0.5 * math.pi * sin)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LinearSchedule, SqrtBetaSchedule, CosineSchedule)
}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A schedule object as it is, or the one ``schedule`` names (an alias of ``SCHEDULES``, a
    class name or a class path)."""
    if isinstance(schedule, Schedule):
        return schedule
    return resolve(schedule, Schedule, SCHEDULES)()
