"""Tensor layouts shared by the native and Triton launchers of this family (imports neither triton nor the
extension).

* activity maps cross the kernel boundary as contiguous ``uint8`` views (:func:`as_u8`);
* the masked batch norm reads ``x [B, C, H, W]`` as ``[B, C, H*W]`` in place when H and W merge into one
  stride (NCHW or channels_last: :func:`mergeable`, :func:`bcs_strides`) and writes its outputs in x's
  memory format (:func:`empty_as`);
* ``out=`` buffers handed to a launcher (tests) are checked by :func:`check_out_buffer`.

Every output buffer comes from ``kernels._buffers`` (the tests' poisoning seam).
"""

from __future__ import annotations

import torch

from kernels import _buffers


def as_u8(active: torch.Tensor) -> torch.Tensor:
    return active.contiguous().view(torch.uint8)


def check_out_buffer(name: str, buf: torch.Tensor, shape, like: torch.Tensor) -> None:
    if buf.shape != shape or buf.dtype != like.dtype or not buf.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous {like.dtype} buffer of shape {tuple(shape)}, "
            f"got {buf.dtype} {tuple(buf.shape)}"
        )


def mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when NCHW- or channels_last-contiguous (H and W then merge into one stride, so the kernels
    read ``[B, C, H*W]`` in place), else an NCHW-contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def bcs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a :func:`mergeable` ``t [B, C, H, W]`` read as ``[B, C, H*W]``."""
    return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)


def empty_as(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer shaped like the 4-D :func:`mergeable` ``t``, in its memory format (channels_last
    stays channels_last), from ``kernels._buffers``."""
    B, C, H, W = t.shape
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return _buffers.empty((B, H, W, C), t.dtype, t.device).permute(0, 3, 1, 2)
    return _buffers.empty((B, C, H, W), t.dtype, t.device)
