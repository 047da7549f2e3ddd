"""Exponential moving averages and the schedules that drive them, for self-distillation recipes (a teacher that
follows its student).

- :func:`cosine_schedule` -- ``start`` at step 0 to ``end`` at step ``total`` on a half cosine (DINO's teacher
  momentum 0.994 -> 1);
- :func:`linear_warmup` -- ``start`` to ``end`` over ``warmup`` steps, then ``end`` (DINO's teacher temperature);
- :func:`ema_update_` -- ``teacher = m * teacher + (1 - m) * student``, parameter by parameter, in place.

Schedules are functions of the step only, so a run resumed from a checkpoint at step ``n`` continues them exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["cosine_schedule", "ema_update_", "linear_warmup"]


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * step / total)) / 2``: ``start`` at 0, ``end`` at and after ``total``."""
    if total <= 0:
        return float(end)
    t = min(max(step, 0), total) / total
    return float(end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """``start`` at step 0, linearly to ``end`` at step ``warmup``, ``end`` after (``warmup <= 0``: ``end``)."""
    if warmup <= 0 or step >= warmup:
        return float(end)
    return float(start + (end - start) * max(step, 0) / warmup)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every parameter pair (same order, same shapes): ``t <- m * t + (1 - m) * s``.

    Buffers (e.g. BatchNorm running statistics) are left as they are: the teacher's own forward passes keep them.
    ``momentum`` 1 leaves the teacher unchanged; 0 copies the student.
    """
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}: not copies of one network")
    m = float(momentum)
    for t, s in zip(t_params, s_params):
        t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)
