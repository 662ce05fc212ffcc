"""Every output buffer of every kernel launcher comes from here: the one seam the tests swap for a
NaN-poisoning allocator (``monkeypatch.setattr(kernels._buffers, "empty", ...)``), so an element that a
kernel forgets to write fails the test. Launchers call ``_buffers.empty(...)`` through the module, never a
name imported from it, so the swap reaches them.
"""

from __future__ import annotations

import torch


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype or t.dtype, t.device)


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Accumulation buffers (atomics) must start at zero; they are not poisoned."""
    return torch.zeros(shape, dtype=dtype, device=device)
