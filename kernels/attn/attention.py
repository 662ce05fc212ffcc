"""``attention(q, k, v, bias=None, scale=None)``: validation, dispatch and the autograd Function.

Backends (see :mod:`kernels._backend`):

* ``triton``     FlashAttention-2 style fused forward (online softmax, log-sum-exp saved) and a fused
  backward giving dq, dk, dv and dbias; dbias is reduced to the bias's own shape inside the kernels in
  float32. CUDA tensors of float16/bfloat16/float32 with head dim <= 128 (CPU only under
  ``TRITON_INTERPRET=1`` when forced).
* ``reference``  the math path of :mod:`kernels.attn.reference` (any device, dtype, head dim).

Determinism: with a bias broadcast over the batch, the default backward adds each batch element's
dbias tile with float32 atomics (order not fixed). ``deterministic=True``, ``KERNELS_DETERMINISTIC=1``
or ``torch.use_deterministic_algorithms(True)`` switch to a kernel in which each program owns a
(head, q-tile, k-tile) block of dbias and loops over the batch in a fixed order: bitwise-reproducible.
dq, dk, dv never use atomics. A per-batch bias ([B,H,N,N]) is written without atomics in both modes.

float32 inputs: the Triton dots use TF32 when ``torch.get_float32_matmul_precision()`` is ``"high"``
or ``"medium"`` and full IEEE float32 otherwise (the PyTorch default, "highest").

Huge inputs: when ``q k^T * scale`` overflows float32 (``|q|, |k|`` ~ 1e19 and beyond) the fused kernel
and the math path give NaN rows (``inf - inf`` in the softmax). In eager mode both backends then recompute
the call in float64 (exact, autograd included) and round back; float64 inputs whose scores overflow raise a
``ValueError``. The check is one sum over the output and one host sync per eager call: always on CPU, on a
GPU only with ``KERNELS_CHECK_OVERFLOW=1`` (no sync stalls the GPU pipeline by default), never under
``torch.compile`` or CUDA graph capture (see :func:`kernels.attn.reference.recompute_if_overflowed`).
"""

from __future__ import annotations

import math
import os

import torch

from kernels import _backend
from kernels.attn.reference import attention_reference, default_scale, recompute_if_overflowed

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 128

attention_op = _backend.define_op(
    "attention", "softmax(q k^T * scale + bias) v with a learnable additive bias and its gradient"
)


def deterministic_requested(deterministic: bool | None) -> bool:
    if deterministic is not None:
        return bool(deterministic)
    if os.environ.get("KERNELS_DETERMINISTIC", "0") not in ("", "0"):
        return True
    return torch.are_deterministic_algorithms_enabled()


def _check_inputs(q, k, v, bias, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, N, d], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"attention: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
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
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"attention: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"attention: bias must be floating point, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"attention: bias is on {bias.device} but q is on {q.device}")
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
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a python float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite float, got {scale}")


def attention(q, k, v, bias=None, scale=None, *, deterministic: bool | None = None):
    """``softmax(q k^T * scale + bias) v``.

    Args:
        q: [B, H, Nq, d]; k, v: [B, H, Nk, d]; any strides; one floating dtype.
        bias: optional additive bias broadcastable to [B, H, Nq, Nk]: [H, Nq, Nk], [1, H, Nq, Nk] or
            [B, H, Nq, Nk] (a 1 in place of H is accepted too). Its gradient (if it requires grad) is
            returned in its own shape and dtype, accumulated in float32; the batch reduction happens in
            the kernels, a head reduction (bias with 1 in place of H) is a torch sum afterwards.
        scale: multiplier of ``q k^T``; default ``d ** -0.5``.
        deterministic: bitwise-reproducible dbias (see module docstring); default from
            ``KERNELS_DETERMINISTIC`` or ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        [B, H, Nq, d] in the dtype of q. The Triton backend returns a [B, Nq, H, d]-contiguous tensor
        viewed as [B, H, Nq, d], so ``out.transpose(1, 2).reshape(B, Nq, H * d)`` is free.
    """
    _check_inputs(q, k, v, bias, scale)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph (kernels.library)
        from kernels._library.attention import attention as registered

        return registered(q, k, v, bias, scale, deterministic_requested(deterministic))
    return attention_op(q, k, v, bias, scale, deterministic_requested(deterministic))


# ----------------------------------------------------------------------------------------------------------
# backends


def _triton_reasons(q, k, v, bias, scale, deterministic):
    reasons = list(_backend.triton_reasons(q, k, v, bias))
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported by the Triton kernel (float16, bfloat16, float32)")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} is not supported by the Triton kernel (at most {TRITON_MAX_HEAD_DIM})")
    if bias is not None and bias.dtype == torch.float64:
        reasons.append("a float64 bias is not supported by the Triton kernel")
    return reasons


class AttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton launchers (forward saves the log-sum-exp, backward recomputes P)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, deterministic):
        from kernels.attn import attention_triton as triton_kernels

        out, lse = triton_kernels.attention_forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        ctx.deterministic = deterministic
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        from kernels.attn import attention_triton as triton_kernels

        q, k, v, bias, out, lse = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = triton_kernels.attention_backward(
            grad_out, q, k, v, bias, out, lse, ctx.scale, need_dbias=need_dbias, deterministic=ctx.deterministic
        )
        return dq, dk, dv, dbias, None, None


@attention_op.register("triton", _triton_reasons, note="fused fwd+bwd incl. dbias")
def _attention_triton(q, k, v, bias, scale, deterministic):
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        # inference (e.g. the DINO teacher): no autograd node, nothing saved for a backward
        from kernels.attn import attention_triton as triton_kernels

        out = triton_kernels.attention_forward(q, k, v, bias, scale)[0]
    else:
        out = AttentionFunction.apply(q, k, v, bias, scale, deterministic)
    return recompute_if_overflowed(out, q, k, v, bias, scale)


@attention_op.register("reference", note="math path")
def _attention_reference(q, k, v, bias, scale, deterministic):
    return attention_reference(q, k, v, bias, scale)
