"""Helpers shared by the Triton launchers (imports triton: only the triton backends import this module)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton accumulation type of an input dtype: fp64 for fp64, else fp32 (see kernels._checks.acc_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def dot_acc(acc, a, b, DOT_F32: tl.constexpr, USE_DOT: tl.constexpr):
    """``acc + a @ b`` for tiles a [M, K], b [K, N]: a tensor-core dot with IEEE float32 inputs
    (``DOT_F32``: the CPU interpreter miscomputes bf16 dots, so it gets them upcast), a dot in the inputs'
    dtype (``USE_DOT``: float16/bfloat16/float32 on a GPU), else a broadcast multiply-and-sum in acc's dtype
    (float64, which tl.dot does not take)."""
    if DOT_F32:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif USE_DOT:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)
    return acc
