"""Helpers shared by the Triton launchers (imports triton: only the triton backends import this module)."""

from __future__ import annotations

import torch
import triton.language as tl


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton accumulation type of an input dtype: fp64 for fp64, else fp32 (see kernels._checks.acc_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
