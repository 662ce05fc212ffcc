"""Per-op ``torch.library`` registrations behind :mod:`kernels.library` (namespace ``ssl_kernels``).

Each module registers a forward and (where the op is differentiable) a backward custom op, their fake
(meta) implementations and ``register_autograd``. The real implementations pick their backend with the
op's own capability declarations (:mod:`kernels._backend`), so ``use_backend`` and ``KERNELS_BACKEND``
apply inside compiled graphs too. Nothing here imports triton at import time.
"""

from __future__ import annotations

import torch

from kernels import _backend

NAMESPACE = "ssl_kernels"


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def backend_for(op_name: str, *args) -> str:
    """The backend :mod:`kernels._backend` would run for ``op_name`` on these arguments (raises when none)."""
    return _backend.REGISTRY[op_name].select(*args).backend


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32: the accumulation type of every kernel here."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def nothing(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 0-element placeholder returned for a gradient that was not requested (schemas have no Tensor?)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)
