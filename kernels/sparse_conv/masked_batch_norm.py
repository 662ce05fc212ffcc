"""masked_batch_norm: batch-norm statistics and normalisation over the active sites of a sparse map (SparK).

With ``m = active[b, h, w]`` and ``n = sum m`` (the statistics are per channel c)::

    mean_c = sum m x / n        var_c = sum m (x - mean_c)^2 / n           (biased, as BatchNorm normalises)
    y      = m * ((x - mean_c) / sqrt(var_c + eps) * w_c + b_c)             (exact zeros at inactive sites)

Gradients flow to x (active sites only), weight and bias. ``n = 0`` gives y = 0 and zero gradients. Returns
``(y, mean, var, n)``; the last three (no gradient) let :class:`SparseBatchNorm2d` update its running
estimates. ``residual=`` / ``relu=`` add the ResNet epilogue ``y = ReLU(BN(x) + residual)`` (fused into the
C++ passes on the native backend, the backward gated by ``y > 0``; composed elsewhere). Backends: C++/OpenMP on CPU (``csrc/masked_bn.cpp`` via ``masked_batch_norm_native.py``,
float32/float64), Triton on CUDA (fused partial reductions, no atomics: ``masked_batch_norm_triton.py``),
both with forward and backward on the same backend through :data:`MaskedBatchNormFunction`, and the
pure-PyTorch reference of ``reference.py`` otherwise (half precision on CPU; plain autograd). Under
``torch.compile`` the reference is traced (Inductor fuses its reductions), so this op registers no custom op.
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor

from kernels._backend import define_op, native_reasons, triton_reasons
from kernels._checks import FLOAT_DTYPES, NATIVE_DTYPES, acc_dtype, check_real, check_same_device, dtype_name
from kernels._op import eager_function
from kernels.sparse_conv.layout import as_u8, mergeable
from kernels.sparse_conv import masked_batch_norm_native
from kernels.sparse_conv.reference import masked_batch_norm_reference

# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class MaskedBatchNormInputs:
    """Checked arguments: ``x [B, C, H, W]``, ``active [B, H, W]`` bool, optional ``weight``/``bias`` [C]."""

    x: Tensor
    active: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float

    @property
    def args(self) -> tuple:
        return (self.x, self.active, self.weight, self.bias, self.eps)


def validate(x, active, weight=None, bias=None, eps=1e-5) -> MaskedBatchNormInputs:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() != 4:
        got = f"{dtype_name(x.dtype)} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating [B, C, H, W] tensor, got {got}")
    B, C, H, W = x.shape
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or tuple(active.shape) != (B, H, W):
        got = (f"{dtype_name(active.dtype)} {tuple(active.shape)}" if isinstance(active, torch.Tensor)
               else type(active).__name__)
        raise ValueError(f"active: expected a bool tensor of shape {(B, H, W)} (x's batch and spatial dims), "
                         f"got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape ({C},) (x's channels), got {got}")
    check_same_device(x=x, active=active, weight=weight, bias=bias)
    eps = check_real("eps", eps, lo=0.0, lo_open=True)
    return MaskedBatchNormInputs(x, active, weight, bias, eps)


# ----------------------------------------------------------------------------------------------------------
# backends

OP = define_op("masked_batch_norm", doc="batch-norm statistics and normalisation over active sites")


def _native_reasons(i: MaskedBatchNormInputs) -> list[str]:
    devices = {t.device.type for t in i.args[:4] if t is not None}
    if devices != {"cpu"}:
        return [f"native masked_batch_norm runs on CPU tensors only, got {sorted(devices)}"]
    if i.x.dtype not in NATIVE_DTYPES:
        return [f"native masked_batch_norm supports float32/float64, got {dtype_name(i.x.dtype)}"]
    return native_reasons()


def _launchers(backend: str):
    """The launcher module of a kernel backend (same signatures; the Triton one imported on first use)."""
    if backend == "native":
        return masked_batch_norm_native
    from kernels.sparse_conv import masked_batch_norm_triton

    return masked_batch_norm_triton


def _forward_launchers(backend: str, i: MaskedBatchNormInputs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, n, rstd): the kernels' rstd is handed on to the backward, not recomputed."""
    n = i.active.sum().to(acc_dtype(i.x.dtype))
    y, mean, var, rstd = _launchers(backend).masked_batch_norm_forward(mergeable(i.x), as_u8(i.active), n,
                                                                        i.weight, i.bias, i.eps)
    return y, mean, var, n, rstd


OP.register("native", _native_reasons, note="C++/OpenMP, two-pass statistics (CPU)")(
    functools.partial(_forward_launchers, "native"))
OP.register("triton", lambda i: triton_reasons(*i.args[:4]), note="fused partial reductions, no atomics")(
    functools.partial(_forward_launchers, "triton"))


@OP.register("reference", note="masked torch reductions")
def _forward_reference(i: MaskedBatchNormInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return masked_batch_norm_reference(*i.args)


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(x: Tensor, active: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y like x in its memory format, mean [C], var [C], n 0-dim, rstd [C]) on the selected kernel backend."""
    i = MaskedBatchNormInputs(x, active, weight, bias, eps)
    return OP.select(i).fn(i)


def _backward_kernels(backend: str, dy: Tensor, x: Tensor, mask_u8: Tensor, n: Tensor, mean: Tensor, rstd: Tensor,
                      weight: Optional[Tensor], need_x: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(dx or None, g_w = sum m dy xhat, g_b = sum m dy) on the backend that ran the forward."""
    return _launchers(backend).masked_batch_norm_backward(mergeable(dy), x, mask_u8, n, mean, rstd, weight, need_x)


def _setup_context(ctx, inputs, output):
    x, active, weight, bias, eps = inputs
    _y, mean, var, n, rstd = output
    ctx.backend = OP.select(MaskedBatchNormInputs(*inputs)).backend
    ctx.save_for_backward(mergeable(x), as_u8(active), n, mean, rstd, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, var, n, rstd)


def _grads(bwd, ctx, dy, _dmean, _dvar, _dn, _drstd):
    x, mask_u8, n, mean, rstd, weight = ctx.saved_tensors
    need_x, _, need_w, need_b, _ = ctx.needs_input_grad
    dx, g_w, g_b = bwd(ctx.backend, dy, x, mask_u8, n, mean, rstd, weight, need_x)
    return (dx, None, g_w.to(weight.dtype) if need_w else None, g_b.to(ctx.bias_dtype) if need_b else None, None)


MaskedBatchNormFunction = eager_function("MaskedBatchNormFunction", _forward, _setup_context,
                                         functools.partial(_grads, _backward_kernels))


# the fused epilogue y = act(BN(x) + residual) (native kernels only; other backends compose the three ops)


def _forward_act(x: Tensor, active: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 residual: Optional[Tensor], relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = active.sum().to(acc_dtype(x.dtype))
    y, mean, var, rstd = masked_batch_norm_native.masked_batch_norm_act_forward(
        mergeable(x), as_u8(active), n, weight, bias, eps,
        None if residual is None else mergeable(residual), relu)
    return y, mean, var, n, rstd


def _setup_context_act(ctx, inputs, output):
    x, active, weight, bias, _eps, residual, relu = inputs
    y, mean, var, n, rstd = output
    ctx.save_for_backward(mergeable(x), as_u8(active), n, mean, rstd, weight, y if relu else None)
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype,
                  None if residual is None else residual.dtype)
    ctx.mark_non_differentiable(mean, var, n, rstd)


def _grads_act(ctx, dy, _dmean, _dvar, _dn, _drstd):
    x, mask_u8, n, mean, rstd, weight, y = ctx.saved_tensors
    need_x, _, need_w, need_b, _, need_r, _ = ctx.needs_input_grad
    dx, g_w, g_b, dr = masked_batch_norm_native.masked_batch_norm_act_backward(
        mergeable(dy), x, y, mask_u8, n, mean, rstd, weight, need_x, need_r)
    w_dtype, b_dtype, r_dtype = ctx.dtypes
    return (dx, None, g_w.to(w_dtype) if need_w else None, g_b.to(b_dtype) if need_b else None, None,
            dr.to(r_dtype) if need_r else None, None)


MaskedBatchNormActFunction = eager_function("MaskedBatchNormActFunction", _forward_act, _setup_context_act,
                                            _grads_act)


# ----------------------------------------------------------------------------------------------------------
# public API


def masked_batch_norm(x, active, weight=None, bias=None, eps=1e-5, *, residual=None, relu=False):
    """Batch norm of ``x [B, C, H, W]`` with statistics over ``active [B, H, W]`` only (module docstring).

    Returns ``(y, mean [C], var [C], n)``: y like x (zeros at inactive sites), the biased batch variance and
    the active-site count (0-dim) for running estimates.

    ``residual`` (a tensor like x) and ``relu``: the ResNet epilogue ``y = ReLU(BN(x) + residual)`` (either
    part optional; at inactive sites ``y = ReLU(residual)``, zero for a sparse residual). On the native
    backend it is one pass forward and one gated pass backward (the ReLU gate read from y), with no separate
    add / ReLU / threshold-backward passes over the whole tensor; other backends compose the three ops.
    """
    i = validate(x, active, weight, bias, eps)
    if residual is not None or relu:
        if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                     or residual.dtype != x.dtype or residual.device != x.device):
            got = (f"{dtype_name(residual.dtype)} {tuple(residual.shape)} on {residual.device}"
                   if isinstance(residual, torch.Tensor) else type(residual).__name__)
            raise ValueError(f"residual: expected a tensor like x ({dtype_name(x.dtype)} {tuple(x.shape)} on "
                             f"{x.device}), got {got}")
        if not torch.compiler.is_compiling():
            impl = OP.select(i)
            if impl.backend == "native":
                with OP.pinned(impl):
                    return MaskedBatchNormActFunction.apply(*i.args, residual, bool(relu))[:4]
        y, mean, var, n = masked_batch_norm(x, active, weight, bias, eps)
        if residual is not None:
            y = y + residual
        return (torch.relu(y) if relu else y), mean, var, n
    if torch.compiler.is_compiling():  # traced: Inductor fuses the reference's reductions
        return masked_batch_norm_reference(*i.args)
    impl = OP.select(i)
    if impl.backend == "reference":
        return impl.fn(i)
    with OP.pinned(impl):
        return MaskedBatchNormFunction.apply(*i.args)[:4]
