"""Tensor layouts shared by the native and Triton launchers of this family (imports neither triton nor the
extension).

* activity maps cross the kernel boundary as contiguous ``uint8`` views (:func:`as_u8`);
* the masked batch norm reads ``x [B, C, H, W]`` as ``[B, C, H*W]`` in place when H and W merge into one
  stride (NCHW or channels_last: :func:`mergeable`, :func:`bcs_strides`) and writes its outputs in x's
  memory format (:func:`empty_as`);
* ``out=`` buffers handed to a launcher (tests) are checked by :func:`check_out_buffer` (:func:`out_or_empty`);
* the Triton weight gradients' per-split partials are summed and laid out as the weight by
  :func:`weight_grads_from_partials`.

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


def out_or_empty(out, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """``out`` once checked (``like``'s dtype, ``shape``, contiguous), else a new buffer from ``kernels._buffers``."""
    if out is None:
        return _buffers.empty(shape, like.dtype, like.device)
    check_out_buffer(name, out, shape, like)
    return out


def weight_grads_from_partials(dw_part: torch.Tensor, db_part: torch.Tensor, weight_shape, dtype: torch.dtype,
                               depthwise: bool, need_bias: bool, out=None, out_bias=None):
    """``(dweight [Cout, Cin/groups, KH, KW], dbias [Cout] or None)`` in ``dtype`` from the float32/float64
    partials the weight-gradient kernels write once per split: ``dw_part`` [split, K, Cout] (depthwise) or
    [split, K, Cin, Cout] with K = KH*KW taps in row-major order, ``db_part`` [split, Cout]; summed over the
    splits in a fixed order (bitwise reproducible), into ``out`` / ``out_bias`` when given."""
    Cout, _, KH, KW = weight_shape
    if depthwise:
        dw = dw_part.sum(0).t().reshape(Cout, 1, KH, KW)
    else:
        dw = dw_part.sum(0).reshape(KH, KW, dw_part.shape[2], Cout).permute(3, 2, 0, 1)
    dw = dw.to(dtype)
    if out is not None:
        check_out_buffer("dweight", out, tuple(weight_shape), dw)
        dw = out.copy_(dw)
    else:
        dw = dw.contiguous()
    db = None
    if need_bias:
        db = db_part.sum(0).to(dtype)
        if out_bias is not None:
            check_out_buffer("dbias", out_bias, (Cout,), db)
            db = out_bias.copy_(db)
    return dw, db


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
