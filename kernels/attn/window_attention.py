"""``window_attention(q, k, v, bias, window_mask=None, scale=None)``: Swin's window attention with its relative
position bias and shifted-window mask, fused.

Swin's blocks attend inside windows of N = Wh*Ww tokens (36 for 6x6, 49 for 7x7). q, k, v are
[B*nW, H, N, d] with the window index of row b equal to ``b mod nW`` (the order of Swin's window partition);
the learnable relative position bias [H, N, N] is shared by every window, and in shifted blocks a constant
mask [nW, N, N] (0 / -100) keeps tokens of different regions apart. timm and the official code add both to a
materialised [B*nW, H, N, N] score tensor; here they are added inside the kernels.

Backends (see :mod:`kernels._backend`):

* ``triton``     one fused forward and one fused backward kernel (:mod:`.window_attention_triton`): the whole
  N x N tile of a (window, head) stays in registers, so no [B*nW, H, N, N] tensor is written; dbias is
  summed over the windows in float32 per program and reduced once on the host (no atomics: bitwise
  reproducible). CUDA tensors of float16/bfloat16/float32 with N <= 64 and head dim <= 64 (CPU only under
  ``TRITON_INTERPRET=1`` when forced).
* ``reference``  the math path of :mod:`.window_attention_reference` (any device, dtype, N and head dim);
  the CPU default.

float32 inputs: the Triton dots use TF32 when ``torch.get_float32_matmul_precision()`` is ``"high"`` or
``"medium"`` and full IEEE float32 otherwise, as :func:`kernels.attention` does.
"""

from __future__ import annotations

import torch

from kernels import _backend
from kernels.attn.reference import default_scale
from kernels.attn.window_attention_reference import window_attention_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_TOKENS = 64
TRITON_MAX_HEAD_DIM = 64

window_attention_op = _backend.define_op(
    "window_attention",
    "Swin window attention softmax(q k^T * scale + bias + mask[b mod nW]) v, dbias summed over the windows",
)


def _check_inputs(q, k, v, bias, window_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"window_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"window_attention: {name} must be 4-D [B*nW, H, N, d], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"window_attention: {name} has dtype {t.dtype}; expected one of float16, bfloat16, "
                            "float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"window_attention: q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"window_attention: q, k, v must be on one device, got q={q.device}, k={k.device}, "
                         f"v={v.device}")
    BW, H, N, d = q.shape
    if min(BW, H, N, d) < 1:
        raise ValueError(f"window_attention: q has an empty dimension: {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"window_attention: {name} must have the shape of q [B*nW, H, N, d] = {tuple(q.shape)} "
                             f"(self-attention inside each window), got {tuple(t.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"window_attention: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"window_attention: bias must be floating point, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"window_attention: bias is on {bias.device} but q is on {q.device}")
        if tuple(bias.shape) != (H, N, N):
            raise ValueError(f"window_attention: bias must be the relative position bias [H, N, N] = [{H}, {N}, {N}] "
                             f"of q {tuple(q.shape)}, got {tuple(bias.shape)}")
    if window_mask is not None:
        if not isinstance(window_mask, torch.Tensor):
            raise TypeError(f"window_attention: window_mask must be a torch.Tensor or None, "
                            f"got {type(window_mask).__name__}")
        if not window_mask.is_floating_point():
            raise TypeError(f"window_attention: window_mask must be floating point (0 / -100), got {window_mask.dtype}")
        if window_mask.device != q.device:
            raise ValueError(f"window_attention: window_mask is on {window_mask.device} but q is on {q.device}")
        if window_mask.dim() != 3 or tuple(window_mask.shape[1:]) != (N, N) or window_mask.shape[0] < 1:
            raise ValueError(f"window_attention: window_mask must be [nW, N, N] = [nW, {N}, {N}], "
                             f"got {tuple(window_mask.shape)}")
        if BW % window_mask.shape[0]:
            raise ValueError(f"window_attention: window_mask has nW = {window_mask.shape[0]} windows, which does not "
                             f"divide the B*nW = {BW} rows of q")
        if window_mask.requires_grad:
            raise ValueError("window_attention: window_mask is a constant and gets no gradient; pass it detached "
                             "(e.g. a buffer)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"window_attention: scale must be a python float or None, got {type(scale).__name__}")


def window_attention(q, k, v, bias=None, window_mask=None, scale=None):
    """``softmax(q k^T * scale + bias + window_mask[b mod nW]) v`` for every window row b and head.

    Args:
        q, k, v: [B*nW, H, N, d], any strides, one floating dtype; row b is window ``b mod nW`` of image
            ``b // nW`` (Swin's window partition order).
        bias: optional relative position bias [H, N, N] (learnable; any strides, e.g. the permuted gather of
            the table). Its gradient is summed over all B*nW rows in float32 and returned in its dtype.
        window_mask: optional constant [nW, N, N] (Swin's shifted-window mask: 0 / -100; any finite values or
            -inf); nW must divide B*nW. It never gets a gradient.
        scale: multiplier of ``q k^T``; default ``d ** -0.5``.

    Returns:
        [B*nW, H, N, d] in q's dtype. The Triton backend returns a [B*nW, N, H, d]-contiguous tensor viewed
        as [B*nW, H, N, d], so ``out.transpose(1, 2).reshape(B*nW, N, H * d)`` is free.
    """
    _check_inputs(q, k, v, bias, window_mask, scale)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph (kernels.library)
        from kernels._library.window_attention import window_attention as registered

        return registered(q, k, v, bias, window_mask, scale)
    return window_attention_op(q, k, v, bias, window_mask, scale)


# ----------------------------------------------------------------------------------------------------------
# backends


def _triton_reasons(q, k, v, bias, window_mask, scale):
    reasons = list(_backend.triton_reasons(q, k, v, bias, window_mask))
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported by the Triton kernel (float16, bfloat16, float32)")
    if q.shape[2] > TRITON_MAX_TOKENS:
        reasons.append(f"windows of {q.shape[2]} tokens are not supported by the Triton kernel (at most "
                       f"{TRITON_MAX_TOKENS}, an 8x8 window)")
    if q.shape[3] > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[3]} is not supported by the Triton kernel (at most {TRITON_MAX_HEAD_DIM})")
    for name, t in (("bias", bias), ("window_mask", window_mask)):
        if t is not None and t.dtype == torch.float64:
            reasons.append(f"a float64 {name} is not supported by the Triton kernel")
    return reasons


class WindowAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton launchers (the backward recomputes P; nothing but the inputs is saved)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, window_mask, scale):
        from kernels.attn import window_attention_triton as wt

        out = wt.window_attention_forward(q, k, v, bias, window_mask, scale)
        ctx.save_for_backward(q, k, v, bias, window_mask)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        from kernels.attn import window_attention_triton as wt

        q, k, v, bias, window_mask = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = wt.window_attention_backward(grad_out, q, k, v, bias, window_mask, ctx.scale, need_dbias)
        return dq, dk, dv, dbias, None, None


@window_attention_op.register("triton", _triton_reasons, note="fused fwd + fused bwd, dbias without atomics")
def _window_attention_triton(q, k, v, bias, window_mask, scale):
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        from kernels.attn import window_attention_triton as wt

        return wt.window_attention_forward(q, k, v, bias, window_mask, scale)
    return WindowAttentionFunction.apply(q, k, v, bias, window_mask, scale)


@window_attention_op.register("reference", note="math path")
def _window_attention_reference(q, k, v, bias, window_mask, scale):
    return window_attention_reference(q, k, v, bias, window_mask, scale)
