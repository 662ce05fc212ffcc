"""Per-iteration schedules, precomputed once as float64 arrays indexed by the optimizer step.

Cosine with linear warm-up (learning rate, weight decay, EMA momentum)::

    v(t) = start + (base - start) * t / W                         for t < W
    v(t) = final + (base - final) * (1 + cos(pi * (t - W) / (T - W))) / 2   for W <= t < T

Linear warm-up then constant (DINO teacher temperature)::

    v(t) = start + (final - start) * t / W  for t < W,   final afterwards.

Precomputing the whole array makes the schedule position part of the checkpoint for free: it is the step.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """``total_steps`` values: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = total_steps - warmup_steps
    t = np.arange(rest, dtype=np.float64)
    denom = max(rest - 1, 1)
    cos = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * t / denom))
    out = np.concatenate([warm, cos]).astype(np.float64)
    assert len(out) == total_steps
    return out


def warmup_constant_schedule(start: float, final: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear from ``start`` to ``final`` over ``warmup_steps``, then ``final`` for the remaining steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    warm = np.linspace(start, final, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    return np.concatenate([warm, np.full(total_steps - warmup_steps, final, dtype=np.float64)])


def scaled_lr(blr: float, batch_size: int, world_size: int = 1, accum_steps: int = 1) -> float:
    """Linear scaling rule: ``lr = blr * effective_batch / 256`` with effective batch = batch x world x accum."""
    return blr * batch_size * world_size * accum_steps / 256.0
