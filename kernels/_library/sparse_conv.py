"""``ssl_kernels::sparse_conv2d_fwd`` / ``_bwd``: the SparK sparse convolution as custom ops.

With activity maps ``a_in [B, H, W]``, ``a_out [B, Ho, Wo]`` (bool) and ``conv`` = ``F.conv2d``::

    out = conv(x * a_in, W, b) * a_out                       (channels_last memory on every backend)
    ga  = g * a_out
    dx  = conv^T(ga, W) * a_in    dW = conv_weight_grad(x * a_in, ga)    db = sum_{b,h,w} ga

The native (C++) and Triton backends run the launchers of :mod:`kernels.sparse_conv` (gather-GEMM-scatter
at active sites only); the reference runs the dense formulas. :mod:`kernels.sparse_conv` is imported
inside the implementations, so this registration does not depend on its import order.
"""

# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._library import backend_for, nothing, qualname

CL = torch.channels_last


def _launchers(backend: str):
    if backend == "native":
        from kernels.sparse_conv import native

        return native
    from kernels.sparse_conv import triton_kernels

    return triton_kernels


def _conf(x, weight, stride, padding, dilation, groups):
    from kernels.sparse_conv.function import is_depthwise

    return tuple(stride), tuple(padding), tuple(dilation), is_depthwise(weight, groups, x.shape[1])


@torch.library.custom_op(qualname("sparse_conv2d_fwd"), mutates_args=())
def sparse_conv2d_fwd(x: Tensor, active_in: Tensor, active_out: Tensor, weight: Tensor, bias: Optional[Tensor],
                      stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """[B, Cout, Ho, Wo] (channels_last), zeros at inactive output sites."""
    s, p, d, depthwise = _conf(x, weight, stride, padding, dilation, groups)
    backend = backend_for("sparse_conv2d", x, active_in, active_out, weight, bias, s, p, d, groups)
    if backend == "reference":
        from kernels.sparse_conv.reference import sparse_conv2d_reference

        out = sparse_conv2d_reference(x, active_in, active_out, weight, bias, s, p, d, groups)
        return out.contiguous(memory_format=CL)
    out = _launchers(backend).forward(x.permute(0, 2, 3, 1).contiguous(), active_in, active_out, weight, bias,
                                      s, p, d, depthwise)
    return out.permute(0, 3, 1, 2)


@sparse_conv2d_fwd.register_fake
def _(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    B, Ho, Wo = active_out.shape
    return x.new_empty((B, weight.shape[0], Ho, Wo)).contiguous(memory_format=CL)


@torch.library.custom_op(qualname("sparse_conv2d_bwd"), mutates_args=())
def sparse_conv2d_bwd(grad_out: Tensor, x: Tensor, active_in: Tensor, active_out: Tensor, weight: Tensor,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int, need_x: bool,
                      need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx channels_last, dW, db) in the dtypes of x and weight; 0-element where not requested."""
    s, p, d, depthwise = _conf(x, weight, stride, padding, dilation, groups)
    backend = backend_for("sparse_conv2d", x, active_in, active_out, weight, None, s, p, d, groups)
    dx = dw = db = None
    if backend == "reference":
        ga = grad_out * active_out.unsqueeze(1).to(grad_out.dtype)
        if need_x:
            dx = torch.nn.grad.conv2d_input(x.shape, weight, ga, s, p, d, groups)
            dx = (dx * active_in.unsqueeze(1).to(dx.dtype)).contiguous(memory_format=CL)
        if need_w:
            xin = x * active_in.unsqueeze(1).to(x.dtype)
            dw = torch.nn.grad.conv2d_weight(xin, weight.shape, ga, s, p, d, groups).contiguous()
        if need_b:
            db = ga.sum(dim=(0, 2, 3)).to(weight.dtype)
    else:
        impl = _launchers(backend)
        g = grad_out.permute(0, 2, 3, 1).contiguous()
        if need_x:
            dx = impl.backward_input(g, active_in, active_out, weight, s, p, d, depthwise).permute(0, 3, 1, 2)
        if need_w or need_b:
            dw, db = impl.backward_weight(x.permute(0, 2, 3, 1).contiguous(), g, active_in, active_out,
                                          tuple(weight.shape), s, p, d, depthwise, need_bias=need_b)
            dw = dw.to(weight.dtype).contiguous() if need_w else None
            db = db.to(weight.dtype) if need_b else None
    return (dx if dx is not None else nothing(x), dw if dw is not None else nothing(weight),
            db if db is not None else nothing(weight))


@sparse_conv2d_bwd.register_fake
def _(grad_out, x, active_in, active_out, weight, stride, padding, dilation, groups, need_x, need_w, need_b):
    return (x.new_empty(x.shape).contiguous(memory_format=CL) if need_x else nothing(x),
            weight.new_empty(weight.shape) if need_w else nothing(weight),
            weight.new_empty((weight.shape[0],)) if need_b else nothing(weight))


def _setup(ctx, inputs, output):
    x, active_in, active_out, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, active_in, active_out, weight)
    ctx.conf = (stride, padding, dilation, groups, bias is not None)


def _backward(ctx, grad_out):
    x, active_in, active_out, weight = ctx.saved_tensors
    stride, padding, dilation, groups, has_bias = ctx.conf
    need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
    need_b = bool(need_b and has_bias)
    dx, dw, db = sparse_conv2d_bwd(grad_out, x, active_in, active_out, weight, stride, padding, dilation, groups,
                                   need_x, need_w, need_b)
    return (dx if need_x else None, None, None, dw if need_w else None, db if need_b else None,
            None, None, None, None)


sparse_conv2d_fwd.register_autograd(_backward, setup_context=_setup)


def sparse_conv2d(x, active, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, active_out=None):
    """Same contract as :func:`kernels.sparse_conv2d` (validates, returns ``(out, active_out)``) via the ops."""
    from kernels.sparse_conv.active import downsample_active
    from kernels.sparse_conv.function import validate

    stride, padding, dilation, out_shape = validate(x, active, weight, bias, stride, padding, dilation, groups,
                                                    active_out)
    if active_out is None:
        active_out = downsample_active(active, stride, out_shape[1:])
    out = sparse_conv2d_fwd(x, active, active_out, weight, bias, list(stride), list(padding), list(dilation),
                            int(groups))
    return out, active_out
