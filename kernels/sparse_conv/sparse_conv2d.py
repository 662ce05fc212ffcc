"""sparse_conv2d: the SparK / submanifold sparse convolution, one op (layout of kernels/_op.py).

Maths (``k = (kh, kw)``, ``p(o, k) = (b, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw)`` the input site read by
output site ``o = (b, oh, ow)`` at offset ``k``; a_in/a_out the activity maps)::

    out[b, co, o] = a_out[o] * (bias[co] + sum_k sum_ci a_in[p(o,k)] x[b, ci, p(o,k)] W[co, ci, k])
    dx[b, ci, p]  = a_in[p]  * sum_{(o,k): p(o,k)=p} a_out[o] sum_co g[b, co, o] W[co, ci, k]
    dW[co, ci, k] = sum_o a_out[o] a_in[p(o,k)] g[b, co, o] x[b, ci, p(o,k)]
    dbias[co]     = sum_o a_out[o] g[b, co, o]

(depthwise: ``ci = co`` and no sum over ci), i.e. ``F.conv2d(x * a_in, W, b) * a_out`` and its gradients,
computed at active sites only: FLOPs ~ (active output sites) x (kernel taps that hit an active input).

Backends: ``native`` (C++/OpenMP gather-GEMM-scatter, CPU float32/float64: ``sparse_conv2d_native.py``),
``triton`` (implicit GEMM, CUDA; CPU under ``TRITON_INTERPRET=1`` when forced: tiled over whole mask units when
both maps are unit-structured, ``sparse_conv2d_units_triton.py``, else over the active-site list,
``sparse_conv2d_triton.py``; :attr:`SparseConv2dInputs.triton_path` says which),
both in NHWC (channels_last) with forward and backward on the same backend, and ``reference`` (the dense
oracle of ``reference.py``, whose backward is autograd's). Custom ops ``ssl_kernels::sparse_conv2d_fwd`` /
``_bwd``; the eager kernel path runs the same functions through :data:`SparseConv2dFunction`.
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import functools
from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._backend import define_op, native_reasons, triton_reasons
from kernels._checks import FLOAT_DTYPES, NATIVE_DTYPES, check_mask, check_same_device, check_tensor, dtype_name
from kernels._op import custom_op, eager_function, nothing, reference_grads
from kernels.sparse_conv.active import conv_output_size, downsample_active, pair, unit_tiling
from kernels.sparse_conv import sparse_conv2d_native
from kernels.sparse_conv.reference import sparse_conv2d_reference

CL = torch.channels_last
MAX_EXTENT = 2**31 - 1
"""Largest padded input extent, kernel reach, stride and output sites per sample (32-bit site arithmetic)."""
MAX_ELEMENTS = 2**36
"""Largest output (or input-gradient) tensor, in elements (256 GiB of float32: beyond any device)."""


def is_depthwise(weight: torch.Tensor, groups: int, in_channels: int) -> bool:
    return groups > 1 and groups == in_channels and weight.shape[0] == in_channels and weight.shape[1] == 1


def groups_supported(in_channels: int, out_channels: int, groups: int) -> bool:
    """groups = 1 (dense) or depthwise with multiplier 1 (groups = in = out channels)."""
    return groups == 1 or (groups == in_channels == out_channels)


# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class SparseConv2dInputs:
    """Checked arguments: activity maps ``active_in [B, H, W]`` / ``active_out [B, Ho, Wo]`` (bool), the
    convolution's ``stride``/``padding``/``dilation`` as pairs."""

    x: Tensor
    active_in: Tensor
    active_out: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @property
    def tensors(self) -> tuple:
        return (self.x, self.active_in, self.active_out, self.weight, self.bias)

    @property
    def args(self) -> tuple:
        """The custom op's arguments (pairs as lists)."""
        return (*self.tensors, list(self.stride), list(self.padding), list(self.dilation), self.groups)

    @property
    def depthwise(self) -> bool:
        return is_depthwise(self.weight, self.groups, self.x.shape[1])

    @functools.cached_property
    def units(self):
        """``(UnitTiling or None, why not)``: can the Triton kernels tile this layer over whole mask units
        (:func:`kernels.sparse_conv.active.unit_tiling`; maps built from SparK's unit mask are)?"""
        return unit_tiling(self.active_in, self.active_out, tuple(self.weight.shape[2:]), self.stride,
                           self.padding, self.dilation)

    @property
    def triton_path(self) -> str:
        """Which Triton kernels run: ``"units: ..."`` (tiled over whole mask units) or ``"sites: <why>"``
        (implicit GEMM over the padded active-site list: maps that are not unit-structured)."""
        plan, why = self.units
        return f"units: {plan.describe()}" if plan is not None else f"sites: {why}"


def _check_geometry(x, weight, stride, padding, dilation) -> tuple[int, int]:
    """Bounds of the 32-bit site arithmetic; returns the output size ``(Ho, Wo)``."""
    B, C, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    if min(stride) < 1:
        raise ValueError(f"stride: expected values >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation: expected values >= 1, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding: expected values >= 0, got {padding}")
    if KH < 1 or KW < 1:
        raise ValueError(f"weight: expected a kernel of at least 1x1, got {KH}x{KW} (shape {tuple(weight.shape)})")
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
    if Ho * Wo > MAX_EXTENT or B * max(Cout, C) * Ho * Wo > MAX_ELEMENTS:
        raise ValueError(
            f"padding: {padding} (stride {stride}, dilation {dilation}) gives a {Ho}x{Wo} output for a "
            f"{H}x{W} input ({B}x{Cout}x{Ho}x{Wo} = {B * Cout * Ho * Wo} elements): at most 2**31 - 1 output "
            "sites per sample and 2**36 elements per tensor"
        )
    return Ho, Wo


def validate(x, active, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
             active_out=None) -> SparseConv2dInputs:
    """Check the arguments of :func:`sparse_conv2d`; ``active_out`` defaults to the cell rule of
    :func:`~kernels.sparse_conv.active.downsample_active`."""
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES)
    B, C, H, W = x.shape
    check_mask(active, (B, H, W), name="active")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    Cout, cin_g = weight.shape[:2]
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {dtype_name(x.dtype)} (the dtype of x), got {dtype_name(weight.dtype)}")
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
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape != (Cout,):
            raise ValueError(f"bias: expected shape ({Cout},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {dtype_name(x.dtype)}, got {dtype_name(bias.dtype)}")
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    Ho, Wo = _check_geometry(x, weight, stride, padding, dilation)
    if active_out is not None:
        check_mask(active_out, (B, Ho, Wo), name="active_out")
    check_same_device(x=x, active=active, weight=weight, bias=bias, active_out=active_out)
    if active_out is None:
        active_out = downsample_active(active, stride, (Ho, Wo))
    return SparseConv2dInputs(x, active, active_out, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------------------------------------
# backends

OP = define_op("sparse_conv2d", doc="submanifold / SparK sparse 2-D convolution at active sites")


def _native_reasons(i: SparseConv2dInputs) -> list[str]:
    reasons = []
    devices = {t.device.type for t in i.tensors if t is not None}
    if devices != {"cpu"}:
        reasons.append(f"native sparse_conv2d runs on CPU tensors only, got {sorted(devices)}")
    if i.x.dtype not in NATIVE_DTYPES:
        reasons.append(f"native sparse_conv2d supports float32/float64, got {dtype_name(i.x.dtype)}")
    return reasons + (native_reasons() if not reasons else [])


def _launchers(backend: str, i: SparseConv2dInputs, dx: bool = False):
    """``(launcher module, extra arguments)`` of a kernel backend (same signatures; the Triton modules imported
    on first use; the unit kernels take the UnitTiling, for dx only when it covers dx)."""
    if backend == "native":
        return sparse_conv2d_native, ()
    plan = i.units[0]
    if plan is not None and (plan.dx or not dx):
        from kernels.sparse_conv import sparse_conv2d_units_triton

        return sparse_conv2d_units_triton, (plan,)
    from kernels.sparse_conv import sparse_conv2d_triton

    return sparse_conv2d_triton, ()


def _forward_launchers(backend: str, i: SparseConv2dInputs) -> Tensor:
    x_nhwc = i.x.permute(0, 2, 3, 1).contiguous()  # free when x is channels_last
    launchers, extra = _launchers(backend, i)
    out = launchers.forward(x_nhwc, i.active_in, i.active_out, i.weight, i.bias, tuple(i.stride),
                            tuple(i.padding), tuple(i.dilation), i.depthwise, *extra)
    return out.permute(0, 3, 1, 2)


OP.register("native", _native_reasons, note="C++/OpenMP gather-GEMM-scatter (CPU)")(
    functools.partial(_forward_launchers, "native"))
OP.register("triton", lambda i: triton_reasons(*i.tensors),
            note="implicit GEMM tiled over whole mask units, else over active sites (inputs.triton_path)")(
    functools.partial(_forward_launchers, "triton"))


@OP.register("reference", note="dense F.conv2d with re-masking")
def _forward_reference(i: SparseConv2dInputs) -> Tensor:
    return sparse_conv2d_reference(*i.tensors, i.stride, i.padding, i.dilation, i.groups)


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(x: Tensor, active_in: Tensor, active_out: Tensor, weight: Tensor, bias: Optional[Tensor],
             stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """[B, Cout, Ho, Wo] (channels_last), zeros at inactive output sites."""
    i = SparseConv2dInputs(x, active_in, active_out, weight, bias, stride, padding, dilation, groups)
    return OP.select(i).fn(i).contiguous(memory_format=CL)


def _backward_kernels(grad_out: Tensor, x: Tensor, active_in: Tensor, active_out: Tensor, weight: Tensor,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int, need_x: bool,
                      need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx channels_last, dW, db) in the dtypes of x and weight on the backend that takes these inputs (the
    one that ran the forward: :func:`_grads` pins it); 0-element where not requested."""
    i = SparseConv2dInputs(x, active_in, active_out, weight, None, stride, padding, dilation, groups)
    backend = OP.select(i).backend
    if backend == "reference":  # a compiled graph run under another backend than it was traced with
        zero_bias = weight.new_zeros(weight.shape[0])
        dx, _, _, dw, db, *_ = reference_grads(sparse_conv2d_reference, (*i.tensors[:4], zero_bias, *i.args[5:]),
                                               (need_x, False, False, need_w, need_b, *(False,) * 4), (grad_out,))
        dx = dx.contiguous(memory_format=CL) if need_x else None
    else:
        s, p, d = tuple(stride), tuple(padding), tuple(dilation)
        g = grad_out.permute(0, 2, 3, 1).contiguous()
        dx = dw = db = None
        if need_x:
            launchers, extra = _launchers(backend, i, dx=True)
            dx = launchers.backward_input(g, active_in, active_out, weight, s, p, d, i.depthwise, *extra)
            dx = dx.permute(0, 3, 1, 2)
        if need_w or need_b:
            launchers, extra = _launchers(backend, i)
            dw, db = launchers.backward_weight(x.permute(0, 2, 3, 1).contiguous(), g, active_in, active_out,
                                               tuple(weight.shape), s, p, d, i.depthwise, *extra, need_bias=need_b)
    return (dx if dx is not None else nothing(x),
            dw.to(weight.dtype).contiguous() if need_w else nothing(weight),
            db.to(weight.dtype) if need_b else nothing(weight))


def _setup_context(ctx, inputs, output):
    i = SparseConv2dInputs(*inputs)
    ctx.backend = OP.select(i).backend
    ctx.save_for_backward(*(i.tensors if ctx.backend == "reference" else i.tensors[:4]))
    ctx.conf = (i.stride, i.padding, i.dilation, i.groups, i.bias is not None)


def _grads(bwd, ctx, grad_out):
    needs = ctx.needs_input_grad
    stride, padding, dilation, groups, has_bias = ctx.conf
    if ctx.backend == "reference":
        return reference_grads(sparse_conv2d_reference, (*ctx.saved_tensors, stride, padding, dilation, groups),
                               needs, (grad_out,))
    x, active_in, active_out, weight = ctx.saved_tensors
    need_x, _, _, need_w, need_b = needs[:5]
    need_b = bool(need_b and has_bias)
    with OP.pinned(OP.impls[ctx.backend]):  # the backward runs where the forward ran, without selecting again
        dx, dw, db = bwd(grad_out, x, active_in, active_out, weight, stride, padding, dilation, groups, need_x,
                         need_w, need_b)
    return (dx if need_x else None, None, None, dw if need_w else None, db if need_b else None,
            None, None, None, None)


fwd_op = custom_op("sparse_conv2d_fwd", _forward)
bwd_op = custom_op("sparse_conv2d_bwd", _backward_kernels)


@fwd_op.register_fake
def _(x, active_in, active_out, weight, bias, stride, padding, dilation, groups):
    B, Ho, Wo = active_out.shape
    return x.new_empty((B, weight.shape[0], Ho, Wo)).contiguous(memory_format=CL)


@bwd_op.register_fake
def _(grad_out, x, active_in, active_out, weight, stride, padding, dilation, groups, need_x, need_w, need_b):
    return (x.new_empty(x.shape).contiguous(memory_format=CL) if need_x else nothing(x),
            weight.new_empty(weight.shape) if need_w else nothing(weight),
            weight.new_empty((weight.shape[0],)) if need_b else nothing(weight))


fwd_op.register_autograd(functools.partial(_grads, bwd_op), setup_context=_setup_context)
SparseConv2dFunction = eager_function("SparseConv2dFunction", _forward, _setup_context,
                                      functools.partial(_grads, _backward_kernels))


# ----------------------------------------------------------------------------------------------------------
# public API


def sparse_conv2d(x, active, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, active_out=None):
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
        Ho, Wo]``, channels_last memory on the native/Triton paths and in compiled graphs, exact zeros at
        inactive sites) and the output activity map to pass to the next layer.

    Backends: ``native`` (C++/OpenMP, CPU float32/float64, the CPU default), ``triton`` (CUDA; CPU only
    under ``TRITON_INTERPRET=1`` when forced), ``reference`` (dense oracle). All are differentiable in
    ``x``, ``weight`` and ``bias``. Maps built from a unit mask (``upsample_active``, ``sparse_context``: SparK)
    carry their mask units, and the Triton backend then tiles over whole units
    (``validate(...).triton_path`` says which kernels run); other maps take the active-site list.
    """
    i = validate(x, active, weight, bias, stride, padding, dilation, groups, active_out)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph
        return fwd_op(*i.args), i.active_out
    impl = OP.select(i)
    if impl.backend == "reference":
        return impl.fn(i), i.active_out
    with OP.pinned(impl):
        return SparseConv2dFunction.apply(*i.args), i.active_out
