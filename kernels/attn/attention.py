"""``attention(q, k, v, bias=None, scale=None)``: ``softmax(q k^T * scale + bias) v``, one op (kernels/_op.py).

Forward (``S = scale q k^T + bias``, ``P = softmax_row(S)``)::

    out  = P v                                   [B, H, Nq, d], memory [B, Nq, H, d]-contiguous
    lse2 = log2 sum_j exp(S_ij) = logsumexp(S) / ln 2      [B, H, Nq] float32 (saved for the backward)

Backward (``g`` = dL/d out, ``delta_i = sum_j P_ij dP_ij``)::

    dv = P^T g        dP = g v^T        dS = P * (dP - delta)
    dq = scale dS k   dk = scale dS^T q   dbias = dS summed over the dims the bias broadcasts

Backends (see :mod:`kernels._backend`):

* ``triton``     FlashAttention-2 style fused forward (online softmax, log-sum-exp saved) and a fused
  backward giving dq, dk, dv and dbias (:mod:`kernels.attn.attention_triton`: one forward launch, two backward
  launches, 2 + 7 tile GEMMs; its docstring gives the cost model); dbias is reduced over the batch inside the
  kernels in float32. CUDA tensors of float16/bfloat16/float32 with head dim <= 128
  (CPU only under ``TRITON_INTERPRET=1`` when forced).
* ``reference``  the math path of :mod:`kernels.attn.reference` (any device, dtype, head dim); its backward
  is autograd's.

The output layout is the same on every backend (the fake implementation promises it), so
``out.transpose(1, 2).reshape(B, Nq, H * d)`` is a free view.

Determinism: every backend is bitwise reproducible with or without ``deterministic``. The Triton backward
sums the dbias of a bias broadcast over the batch in batch groups, each (head, key tile, group) program owning
its band of the group's float32 partial, and the partials are summed in a fixed order: no atomics, so
nothing is left for a deterministic mode to fix and it costs nothing. ``deterministic=True``,
``KERNELS_DETERMINISTIC=1`` and ``torch.use_deterministic_algorithms(True)`` are still accepted (and still
resolved by :func:`deterministic_requested`) for API compatibility; they no longer change the kernels.

float32 inputs: the Triton dots use TF32 when ``torch.get_float32_matmul_precision()`` is ``"high"``
or ``"medium"`` and full IEEE float32 otherwise (the PyTorch default, "highest").

Huge inputs: when ``q k^T * scale`` overflows float32 (``|q|, |k|`` ~ 1e19 and beyond) the fused kernel
and the math path give NaN rows (``inf - inf`` in the softmax). In eager mode both backends then recompute
the call in float64 (exact, autograd included) and round back; float64 inputs whose scores overflow raise a
``ValueError``. The check is one sum over the output and one host sync per eager call: always on CPU, on a
GPU only with ``KERNELS_CHECK_OVERFLOW=1`` (no sync stalls the GPU pipeline by default), never under
``torch.compile`` or CUDA graph capture (see :func:`kernels.attn.reference.recompute_if_overflowed`).
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._backend import define_op, triton_reasons
from kernels._checks import FLOAT_DTYPES, TRITON_DTYPES, check_real, check_same_device, check_tensor
from kernels._op import custom_op, eager_function, nothing, reference_grads
from kernels.attn.reference import (
    attention_log2_sum_exp,
    attention_math,
    attention_reference,
    default_scale,
    heads_last_empty,
    recompute_if_overflowed,
)

TRITON_MAX_HEAD_DIM = 128

# ----------------------------------------------------------------------------------------------------------
# inputs (the q/k/v and scale checks are shared with window_attention)


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Checked arguments: ``scale`` resolved to a float, ``deterministic`` to a bool."""

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Optional[Tensor]
    scale: float
    deterministic: bool

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.bias, self.scale, self.deterministic)


def deterministic_requested(deterministic: bool | None) -> bool:
    if deterministic is not None:
        return bool(deterministic)
    if os.environ.get("KERNELS_DETERMINISTIC", "0") not in ("", "0"):
        return True
    return torch.are_deterministic_algorithms_enabled()


def check_qkv(op: str, layout: str, q, k, v) -> None:
    """q, k, v: 4-D floating tensors (``layout`` names the dims) of one dtype on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):  # the comparison first: check_same_device costs ~3 us a call
        check_same_device(q=q, k=k, v=v)


def check_table(name: str, t, q) -> None:
    """An optional floating tensor (bias, window mask) on q's device."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, optional=True)
    if t is not None and t.device != q.device:
        check_same_device(q=q, **{name: t})


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` as a finite float; None: ``head_dim ** -0.5``."""
    if scale is None:
        return default_scale(head_dim)
    value = check_real("scale", scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return value


def tensor_core_reasons(q: Tensor, max_head_dim: int, **tables: Tensor | None) -> list[str]:
    """Why the fused Triton kernels (float16/bfloat16/float32 dots) cannot take these inputs."""
    reasons = []
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported by the Triton kernel (float16, bfloat16, float32)")
    if q.shape[-1] > max_head_dim:
        reasons.append(f"head dim {q.shape[-1]} is not supported by the Triton kernel (at most {max_head_dim})")
    for name, t in tables.items():
        if t is not None and t.dtype == torch.float64:
            reasons.append(f"a float64 {name} is not supported by the Triton kernel")
    return reasons


def validate(q, k, v, bias=None, scale=None, deterministic=None) -> AttentionInputs:
    check_qkv("attention", "[B, H, N, d]", q, k, v)
    B, H, Nq, d = q.shape
    if d < 1 or Nq < 1 or k.shape[2] < 1:
        raise ValueError(f"attention: empty sequence or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[:2] != (B, H) or k.shape[3] != d:
        raise ValueError(
            f"attention: k must be [B, H, Nk, d] = [{B}, {H}, Nk, {d}] to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"attention: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    Nk = k.shape[2]
    check_table("bias", bias, q)
    if bias is not None:
        lead = tuple(bias.shape[:-2])
        ok = bias.dim() in (2, 3, 4) and tuple(bias.shape[-2:]) == (Nq, Nk)
        if ok and bias.dim() == 3:
            ok = lead[0] in (1, H)
        if ok and bias.dim() == 4:
            ok = lead[0] in (1, B) and lead[1] in (1, H)
        if not ok:
            raise ValueError(
                f"attention: bias of shape {tuple(bias.shape)} does not broadcast to [B, H, Nq, Nk] = "
                f"[{B}, {H}, {Nq}, {Nk}]; expected [H, Nq, Nk], [1 or B, H, Nq, Nk] (or 1 for H)"
            )
    return AttentionInputs(q, k, v, bias, resolve_scale(scale, d), deterministic_requested(deterministic))


# ----------------------------------------------------------------------------------------------------------
# backends

OP = define_op("attention", "softmax(q k^T * scale + bias) v with a learnable additive bias and its gradient")


def _triton_reasons(i: AttentionInputs) -> list[str]:
    return triton_reasons(i.q, i.k, i.v, i.bias) + tensor_core_reasons(i.q, TRITON_MAX_HEAD_DIM, bias=i.bias)


@OP.register("triton", _triton_reasons, note="fused fwd+bwd incl. dbias")
def _forward_triton(i: AttentionInputs) -> tuple[Tensor, Tensor]:
    from kernels.attn.attention_triton import attention_forward

    return attention_forward(i.q, i.k, i.v, i.bias, i.scale)


@OP.register("reference", note="math path")
def _forward_reference(i: AttentionInputs) -> tuple[Tensor, Tensor]:
    """(out, lse2) for the custom op; eager calls run :func:`attention_reference` directly instead."""
    out = heads_last_empty(i.q)
    out.copy_(attention_reference(i.q, i.k, i.v, i.bias, i.scale))
    return out, attention_log2_sum_exp(i.q, i.k, i.bias, i.scale)


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
             deterministic: bool) -> tuple[Tensor, Tensor]:
    """(out, lse2); ``deterministic`` only matters to the backward (saved with the inputs)."""
    i = AttentionInputs(q, k, v, bias, scale, deterministic)
    return OP.select(i).fn(i)


def _backward_kernels(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                      lse2: Tensor, scale: float, need_dbias: bool,
                      deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward: (dq, dk, dv, dbias); dbias in bias's shape and dtype, or 0 elements unless
    ``need_dbias``."""
    from kernels.attn.attention_triton import attention_backward

    need_dbias = bool(need_dbias and bias is not None)
    dq, dk, dv, db = attention_backward(grad_out, q, k, v, bias, out, lse2, scale, need_dbias=need_dbias,
                                        deterministic=deterministic)
    return dq, dk, dv, db if need_dbias else nothing(q)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, deterministic = inputs
    out, lse2 = output
    ctx.backend = OP.select(AttentionInputs(*inputs)).backend
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.save_for_backward(q, k, v, bias, *(() if ctx.backend == "reference" else (out, lse2)))
    ctx.mark_non_differentiable(lse2)


def _grads(bwd, ctx, grad_out, _grad_lse2):
    needs = ctx.needs_input_grad
    if ctx.backend == "reference":
        grads = reference_grads(attention_math, ctx.saved_tensors, needs[:4], (grad_out,), scale=ctx.scale)
        return (*grads, None, None)
    q, k, v, bias, out, lse2 = ctx.saved_tensors
    need_dbias = bias is not None and needs[3]
    dq, dk, dv, db = bwd(grad_out, q, k, v, bias, out, lse2, ctx.scale, need_dbias, ctx.deterministic)
    return dq, dk, dv, (db if need_dbias else None), None, None


fwd_op = custom_op("attention_fwd", _forward)
bwd_op = custom_op("attention_bwd", _backward_kernels)


@fwd_op.register_fake
def _(q, k, v, bias, scale, deterministic):
    B, H, n_q, _ = q.shape
    return heads_last_empty(q), q.new_empty((B, H, n_q), dtype=torch.float32)


@bwd_op.register_fake
def _(grad_out, q, k, v, bias, out, lse2, scale, need_dbias, deterministic):
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else nothing(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


fwd_op.register_autograd(functools.partial(_grads, bwd_op), setup_context=_setup_context)
AttentionFunction = eager_function("AttentionFunction", _forward, _setup_context,
                                   functools.partial(_grads, _backward_kernels))


# ----------------------------------------------------------------------------------------------------------
# public API


def attention(q, k, v, bias=None, scale=None, *, deterministic: bool | None = None):
    """``softmax(q k^T * scale + bias) v``.

    Args:
        q: [B, H, Nq, d]; k, v: [B, H, Nk, d]; any strides; one floating dtype.
        bias: optional additive bias broadcastable to [B, H, Nq, Nk]: [H, Nq, Nk], [1, H, Nq, Nk] or
            [B, H, Nq, Nk] (a 1 in place of H is accepted too). Its gradient (if it requires grad) is
            returned in its own shape and dtype, accumulated in float32; the batch reduction happens in
            the kernels, a head reduction (bias with 1 in place of H) is a torch sum afterwards.
        scale: multiplier of ``q k^T``; default ``d ** -0.5``.
        deterministic: accepted for compatibility; every result is bitwise reproducible whatever its value
            (see the module docstring).

    Returns:
        [B, H, Nq, d] in the dtype of q. The Triton backend returns a [B, Nq, H, d]-contiguous tensor
        viewed as [B, H, Nq, d], so ``out.transpose(1, 2).reshape(B, Nq, H * d)`` is free.
    """
    i = validate(q, k, v, bias, scale, deterministic)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph
        return fwd_op(*i.args)[0]
    impl = OP.select(i)
    if impl.backend == "reference":
        return attention_reference(i.q, i.k, i.v, i.bias, i.scale)
    with OP.pinned(impl):
        out = AttentionFunction.apply(*i.args)[0]
    return recompute_if_overflowed(out, i.q, i.k, i.v, i.bias, i.scale)
