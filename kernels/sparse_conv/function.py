"""sparse_conv2d: validation, backend dispatch and the autograd Function over the native/Triton launchers.

Maths (``k = (kh, kw)``, ``p(o, k) = (b, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw)`` the input site read by
output site ``o = (b, oh, ow)`` at offset ``k``; a_in/a_out the activity maps)::

    out[b, co, o] = a_out[o] * (bias[co] + sum_k sum_ci a_in[p(o,k)] x[b, ci, p(o,k)] W[co, ci, k])
    dx[b, ci, p]  = a_in[p]  * sum_{(o,k): p(o,k)=p} a_out[o] sum_co g[b, co, o] W[co, ci, k]
    dW[co, ci, k] = sum_o a_out[o] a_in[p(o,k)] g[b, co, o] x[b, ci, p(o,k)]
    dbias[co]     = sum_o a_out[o] g[b, co, o]

(depthwise: ``ci = co`` and no sum over ci), i.e. ``F.conv2d(x * a_in, W, b) * a_out`` and its gradients,
computed at active sites only: FLOPs ~ (active output sites) x (kernel taps that hit an active input).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels._backend import define_op, native_reasons, triton_reasons
from kernels.sparse_conv.active import _pair, conv_output_size, downsample_active
from kernels.sparse_conv.reference import sparse_conv2d_reference

sparse_conv_op = define_op("sparse_conv2d", doc="submanifold / SparK sparse 2-D convolution at active sites")

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_EXTENT = 2**31 - 1
"""Largest padded input extent, kernel reach, stride and output sites per sample (32-bit site arithmetic)."""
MAX_ELEMENTS = 2**36
"""Largest output (or input-gradient) tensor, in elements (256 GiB of float32: beyond any device)."""
NATIVE_DTYPES = (torch.float32, torch.float64)


def _dtype_name(d):
    return str(d).replace("torch.", "")


def is_depthwise(weight: torch.Tensor, groups: int, in_channels: int) -> bool:
    return groups > 1 and groups == in_channels and weight.shape[0] == in_channels and weight.shape[1] == 1


def groups_supported(in_channels: int, out_channels: int, groups: int) -> bool:
    """groups = 1 (dense) or depthwise with multiplier 1 (groups = in = out channels)."""
    return groups == 1 or (groups == in_channels == out_channels)


class SparseConv2dFunction(torch.autograd.Function):
    """Forward and backward through one launcher module (``native`` or ``triton_kernels``) in NHWC."""

    @staticmethod
    def forward(ctx, x, weight, bias, active_in, active_out, stride, padding, dilation, depthwise, impl):
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # free when x is channels_last
        out = impl.forward(x_nhwc, active_in, active_out, weight, bias, stride, padding, dilation, depthwise)
        ctx.save_for_backward(x_nhwc, weight, active_in, active_out)
        ctx.conf = (stride, padding, dilation, depthwise, impl, bias is not None)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_nhwc, weight, active_in, active_out = ctx.saved_tensors
        stride, padding, dilation, depthwise, impl, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.permute(0, 2, 3, 1).contiguous()
        dx = dw = db = None
        if need_x:
            dx = impl.backward_input(g, active_in, active_out, weight, stride, padding, dilation, depthwise)
            dx = dx.permute(0, 3, 1, 2)
        if need_w or (need_b and has_bias):
            dw, db = impl.backward_weight(
                x_nhwc,
                g,
                active_in,
                active_out,
                tuple(weight.shape),
                stride,
                padding,
                dilation,
                depthwise,
                need_bias=bool(need_b and has_bias),
            )
            dw = dw.to(weight.dtype) if need_w else None
            db = db.to(weight.dtype) if db is not None else None
        return dx, dw, db, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# backends


def _native_reasons(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    reasons = []
    devices = {t.device.type for t in (x, weight, bias, active_in, active_out) if t is not None}
    if devices != {"cpu"}:
        reasons.append(f"native sparse_conv2d runs on CPU tensors only, got {sorted(devices)}")
    if x.dtype not in NATIVE_DTYPES:
        reasons.append(f"native sparse_conv2d supports float32/float64, got {_dtype_name(x.dtype)}")
    return reasons + (native_reasons() if not reasons else [])


def _triton_reasons(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    return triton_reasons(x, active_in, active_out, weight, bias)


@sparse_conv_op.register("native", _native_reasons, note="C++/OpenMP gather-GEMM-scatter (CPU)")
def _sparse_conv_native(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    from kernels.sparse_conv import native

    depthwise = is_depthwise(weight, groups, x.shape[1])
    return SparseConv2dFunction.apply(
        x, weight, bias, active_in, active_out, stride, padding, dilation, depthwise, native
    )


@sparse_conv_op.register("triton", _triton_reasons, note="implicit GEMM over active sites")
def _sparse_conv_triton(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    from kernels.sparse_conv import triton_kernels

    depthwise = is_depthwise(weight, groups, x.shape[1])
    return SparseConv2dFunction.apply(
        x, weight, bias, active_in, active_out, stride, padding, dilation, depthwise, triton_kernels
    )


@sparse_conv_op.register("reference", note="dense F.conv2d with re-masking")
def _sparse_conv_reference(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    return sparse_conv2d_reference(x, active_in, active_out, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------------------------------------
# validation and the public API


def _check_float(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype in (float32, float64, bfloat16, float16), "
            f"got {_dtype_name(t.dtype)}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_active(name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype bool, got {_dtype_name(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (batch and spatial dims of the "
            f"{'input' if name == 'active' else 'output'}), got {tuple(t.shape)}"
        )


def validate(x, active, weight, bias, stride, padding, dilation, groups, active_out=None):
    """Check arguments; return normalised ``(stride, padding, dilation, active_out_shape)``."""
    _check_float("x", x, 4)
    _check_float("weight", weight, 4)
    B, C, H, W = x.shape
    _check_active("active", active, (B, H, W))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    Cout, cin_g, KH, KW = weight.shape
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight: expected dtype {_dtype_name(x.dtype)} (the dtype of x), got {_dtype_name(weight.dtype)}"
        )
    if cin_g * groups != C:
        raise ValueError(
            f"weight: expected shape (Cout, {C // groups if C % groups == 0 else '?'}, kh, kw) for "
            f"x with {C} channels and groups={groups}, got {tuple(weight.shape)}"
        )
    if Cout % groups:
        raise ValueError(f"weight: out channels {Cout} must be divisible by groups={groups}")
    if not groups_supported(C, Cout, groups):
        raise ValueError(
            f"groups: sparse_conv2d supports groups=1 or depthwise groups=in_channels=out_channels "
            f"(got groups={groups}, in_channels={C}, out_channels={Cout})"
        )
    if bias is not None:
        _check_float("bias", bias, 1)
        if bias.shape != (Cout,):
            raise ValueError(f"bias: expected shape ({Cout},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {_dtype_name(x.dtype)}, got {_dtype_name(bias.dtype)}")
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(stride) < 1:
        raise ValueError(f"stride: expected values >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation: expected values >= 1, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding: expected values >= 0, got {padding}")
    if KH < 1 or KW < 1:
        raise ValueError(
            f"weight: expected a kernel of at least 1x1, got {KH}x{KW} (shape {tuple(weight.shape)})"
        )
    if Cout < 1:
        raise ValueError(f"weight: expected at least one output channel, got shape {tuple(weight.shape)}")
    # the kernels do site and tap arithmetic in 32-bit integers: keep every extent below 2**31
    for name, value, extent in (
        ("padding", padding, (H + 2 * padding[0], W + 2 * padding[1])),
        ("dilation", dilation, (dilation[0] * (KH - 1) + 1, dilation[1] * (KW - 1) + 1)),
        ("stride", stride, stride),
    ):
        if max(extent) > MAX_EXTENT:
            raise ValueError(
                f"{name}: {value} is too large for a {H}x{W} input and a {KH}x{KW} kernel: it spans "
                f"{extent[0]}x{extent[1]} sites, at most MAX_EXTENT = 2**31 - 1 per dimension"
            )
    Ho, Wo = conv_output_size((H, W), (KH, KW), stride, padding, dilation)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x: input {H}x{W} is too small for kernel {KH}x{KW} with padding {padding} and dilation "
            f"{dilation} (output would be {Ho}x{Wo})"
        )
    numel = B * max(Cout, C) * Ho * Wo
    if Ho * Wo > MAX_EXTENT or numel > MAX_ELEMENTS:
        raise ValueError(
            f"padding: {padding} (stride {stride}, dilation {dilation}) gives a {Ho}x{Wo} output for a "
            f"{H}x{W} input ({B}x{Cout}x{Ho}x{Wo} = {B * Cout * Ho * Wo} elements): at most 2**31 - 1 output "
            "sites per sample and 2**36 elements per tensor"
        )
    if active_out is not None:
        _check_active("active_out", active_out, (B, Ho, Wo))
    devices = {
        n: t.device
        for n, t in {
            "x": x,
            "active": active,
            "weight": weight,
            "bias": bias,
            "active_out": active_out,
        }.items()
        if t is not None
    }
    if len(set(devices.values())) > 1:
        raise ValueError(
            "all inputs must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items())
        )
    return stride, padding, dilation, (B, Ho, Wo)


def sparse_conv2d(
    x, active, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, active_out=None
):
    """Sparse (submanifold, SparK) 2-D convolution computed only at active sites.

    Args:
        x: ``[B, C, H, W]`` float tensor (any strides; channels_last avoids a copy). Values at inactive
            sites are ignored (treated as 0), so a zero-filled masked tensor and an unmasked one agree.
        active: ``bool [B, H, W]`` input activity map.
        weight, bias, stride, padding, dilation, groups: as ``F.conv2d``; ``groups`` must be 1 or
            depthwise (``groups = in_channels = out_channels``).
        active_out: optional ``bool [B, Ho, Wo]`` output activity; default
            :func:`kernels.sparse_conv.active.downsample_active` (stride 1: the same map; stride s: a
            coarse site is active iff any site of its s x s cell is, == SparK's rule for 32-px masks).

    Returns:
        ``(out, active_out)``: ``out = F.conv2d(x * active, weight, bias, ...) * active_out`` (``[B, Cout,
        Ho, Wo]``, channels_last memory on the native/Triton paths, exact zeros at inactive sites) and the
        output activity map to pass to the next layer.

    Backends: ``native`` (C++/OpenMP, CPU float32/float64, the CPU default), ``triton`` (CUDA; CPU only
    under ``TRITON_INTERPRET=1`` when forced), ``reference`` (dense oracle). All are differentiable in
    ``x``, ``weight`` and ``bias``.
    """
    stride, padding, dilation, out_shape = validate(
        x, active, weight, bias, stride, padding, dilation, groups, active_out
    )
    if active_out is None:
        active_out = downsample_active(active, stride, out_shape[1:])
    if torch.compiler.is_compiling():  # the registered custom op keeps torch.compile graphs whole
        from kernels._library.sparse_conv import sparse_conv2d_fwd

        out = sparse_conv2d_fwd(x, active, active_out, weight, bias, list(stride), list(padding), list(dilation),
                                groups)
        return out, active_out
    out = sparse_conv_op(x, active, active_out, weight, bias, stride, padding, dilation, groups)
    return out, active_out
