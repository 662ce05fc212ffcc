"""Pure-PyTorch attention with an additive bias: the oracle in tests and the CPU default.

.. math::

    S = \\mathrm{scale}\\; Q K^\\top + \\mathrm{bias}, \\qquad
    P = \\mathrm{softmax}_{\\text{row}}(S), \\qquad O = P V

with ``q`` [B,H,Nq,d], ``k`` [B,H,Nk,d], ``v`` [B,H,Nk,d] and ``bias`` broadcastable to [B,H,Nq,Nk].
Autograd gives every gradient, including ``dbias`` summed over the broadcast dimensions.
No triton import here.

Overflow: ``q k^T * scale`` can exceed the range of the computing dtype (float32 from ``|q|, |k|`` ~ 1e19;
float16 matmuls from ~100 at d = 64) although q, k and the result are representable. A row with a ``+inf``
score then comes out NaN (``inf - inf`` in the softmax's max subtraction, or ``inf + -inf`` inside the
dot). In eager mode such a result is recomputed in float64 and rounded back
(:func:`recompute_if_overflowed`; float64 inputs whose scores overflow raise a ``ValueError``). The check is
one sum over the output plus a host sync, so it runs on CPU tensors and, on a GPU, only with
``KERNELS_CHECK_OVERFLOW=1`` (a sync per call would stall the asynchronous pipeline; in training the loop's
non-finite guard reports such NaNs at its one sync per step); it is skipped under ``torch.compile``, during
CUDA graph capture and on meta tensors.
"""

from __future__ import annotations

import math
import os

import torch


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def attention_probabilities(q, k, bias=None, scale=None):
    """``softmax(q k^T * scale + bias)`` over the last dim, in the promoted dtype of q and bias.

    Low-precision inputs keep their dtype for the matmul (as eager PyTorch would) but the softmax is
    taken in float32 and rounded back, which is what ``torch.softmax`` does internally on every device.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def _attention_math(q, k, v, bias, scale, dropout_p, training):
    p = attention_probabilities(q, k, bias, scale)
    if dropout_p > 0.0 and training:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    return torch.matmul(p.to(v.dtype), v)


def attention_reference(q, k, v, bias=None, scale=None, deterministic=None, dropout_p: float = 0.0,
                        training: bool = False):
    """Math path ``softmax(q k^T * scale + bias) v``; ``deterministic`` is accepted and ignored.

    ``dropout_p`` applies dropout to the probabilities (only when ``training``), which the fused kernel
    does not support; :class:`kernels.attention.MultiheadSelfAttention` routes ``attn_drop > 0`` here.
    Scores beyond the dtype's range are handled as described in the module docstring.
    """
    out = _attention_math(q, k, v, bias, scale, dropout_p, training)
    return recompute_if_overflowed(out, q, k, v, bias, scale, dropout_p, training)


def _checks_allowed(t: torch.Tensor) -> bool:
    """CPU tensors always; accelerator tensors only with ``KERNELS_CHECK_OVERFLOW=1`` (the check's host sync
    would stall the asynchronous GPU pipeline on every call); never while compiling or capturing."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if t.device.type != "cpu":
        if os.environ.get("KERNELS_CHECK_OVERFLOW", "0") in ("", "0"):
            return False
        return not (t.is_cuda and torch.cuda.is_current_stream_capturing())
    return True


def recompute_if_overflowed(out, q, k, v, bias=None, scale=None, dropout_p: float = 0.0,
                            training: bool = False):
    """``out`` unless it holds NaN because ``q k^T * scale`` overflowed; then the float64 math path, rounded
    to ``out``'s dtype (autograd flows through it). NaN from NaN/inf inputs or from a row whose bias is all
    ``-inf`` is left as it is. float64 inputs with overflowing scores raise a ``ValueError``.

    Costs one sum over ``out`` and a host sync (eager only, see the module docstring); the float64
    recomputation (memory ``B*H*Nq*Nk`` float64 scores) runs only on overflow.
    """
    # a sum is NaN whenever an element is (and is by far the cheapest full reduction on CPU); it can also be
    # NaN from +inf and -inf partial sums of huge finite values, which the exact test below sorts out
    if not _checks_allowed(out) or not bool(torch.isnan(out.detach().sum())):
        return out
    if not bool(torch.isnan(out.detach()).any()):
        return out
    qd, kd = q.detach(), k.detach()
    if not (bool(torch.isfinite(qd).all()) and bool(torch.isfinite(kd).all())):
        return out  # NaN in, NaN out
    scale = default_scale(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        # a product beyond the range gives inf, and inf + (-inf) inside the dot NaN
        overflow = not bool(torch.isfinite(torch.matmul(qd, kd.transpose(-2, -1)) * scale).all())
    if not overflow:
        return out  # e.g. a fully -inf bias row, or NaN in v / bias
    if q.dtype == torch.float64:
        raise ValueError(
            f"attention: q k^T * scale overflows float64 (max |q| = {float(qd.abs().max()):.3g}, max |k| = "
            f"{float(kd.abs().max()):.3g}, scale = {scale:.3g}); such scores are outside what float64 can "
            "represent: scale q or k down"
        )
    wide = _attention_math(q.double(), k.double(), v.double(), None if bias is None else bias.double(),
                           scale, dropout_p, training)
    return wide.to(out.dtype)
