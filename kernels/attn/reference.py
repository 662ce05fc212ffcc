"""Pure-PyTorch attention with an additive bias and Swin window attention: the oracles in tests, the CPU
default, and (through autograd) the reference backward of both ops. No triton import here.

Attention (``q`` [B,H,Nq,d], ``k``/``v`` [B,H,Nk,d], ``bias`` broadcastable to [B,H,Nq,Nk]):

.. math::

    S = \\mathrm{scale}\\; Q K^\\top + \\mathrm{bias}, \\qquad
    P = \\mathrm{softmax}_{\\text{row}}(S), \\qquad O = P V

Autograd gives every gradient, including ``dbias`` summed over the broadcast dimensions.

Window attention (Swin W-MSA / SW-MSA): ``q, k, v`` [B*nW, H, N, d] (window ``w = b mod nW`` of batch row
``b``, the order in which Swin's window partition lays the windows out), a relative position bias ``bias``
[H, N, N] shared by every window and, in shifted blocks, a constant per-window mask ``window_mask``
[nW, N, N] (0 inside a region, -100 across regions)::

    S[b, h] = scale * Q[b, h] K[b, h]^T + bias[h] + window_mask[b mod nW]
    P = softmax_row(S),   O[b, h] = P V[b, h]

Gradients (autograd here; the fused Triton backward evaluates the same formulas)::

    dS = P * (dP - rowsum(P * dP)),  dP = dO V^T
    dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,  dbias[h] = sum_b dS[b, h]

``window_mask`` is a constant: it never receives a gradient.

Overflow (attention): ``q k^T * scale`` can exceed the range of the computing dtype (float32 from
``|q|, |k|`` ~ 1e19; float16 matmuls from ~100 at d = 64) although q, k and the result are representable. A
row with a ``+inf`` score then comes out NaN (``inf - inf`` in the softmax's max subtraction, or
``inf + -inf`` inside the dot). In eager mode such a result is recomputed in float64 and rounded back
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

from kernels import _buffers
from kernels._checks import acc_dtype, host_checks_allowed


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def heads_last_empty(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``like``'s [B, H, N, d] shape and dtype viewed over a [B, N, H, d]-contiguous buffer
    (from :mod:`kernels._buffers`): the output layout of every backend, so the head merge after it is free."""
    B, H, N, d = like.shape
    return _buffers.empty((B, N, H, d), like.dtype, like.device).permute(0, 2, 1, 3)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax; low-precision scores go through a float32 softmax and are rounded back (what
    ``torch.softmax`` does internally on every device)."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def _apply_probabilities(p, v, dropout_p: float, training: bool):
    if dropout_p > 0.0 and training:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    return torch.matmul(p.to(v.dtype), v)


# ----------------------------------------------------------------------------------------------------------
# attention


def _attention_scores(q, k, bias, scale):
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return scores if bias is None else scores + bias


def attention_probabilities(q, k, bias=None, scale=None):
    """``softmax(q k^T * scale + bias)`` over the last dim, in the promoted dtype of q and bias.

    Low-precision inputs keep their dtype for the matmul (as eager PyTorch would) but the softmax is
    taken in float32 and rounded back.
    """
    return _softmax(_attention_scores(q, k, bias, scale))


def attention_log2_sum_exp(q, k, bias, scale) -> torch.Tensor:
    """``logsumexp(scale q k^T + bias) / ln 2`` [B, H, Nq] in float32, computed in float32 (float64 when an
    input is float64): the second output of the ``attention_fwd`` custom op (the Triton backward reads it)."""
    wide = acc_dtype(q.dtype, *(() if bias is None else (bias.dtype,)))
    s = _attention_scores(q.to(wide), k.to(wide), None if bias is None else bias.to(wide), scale)
    return (torch.logsumexp(s, dim=-1) / math.log(2.0)).to(torch.float32)


def attention_math(q, k, v, bias=None, scale=None, dropout_p: float = 0.0, training: bool = False):
    """``softmax(q k^T * scale + bias) v`` as written, without the overflow check: the formula whose autograd
    is the reference backward of the ``attention_fwd`` custom op (that backward may be traced on fake tensors,
    where the check's host sync cannot run)."""
    return _apply_probabilities(attention_probabilities(q, k, bias, scale), v, dropout_p, training)


def attention_reference(q, k, v, bias=None, scale=None, deterministic=None, dropout_p: float = 0.0,
                        training: bool = False):
    """Math path ``softmax(q k^T * scale + bias) v``; ``deterministic`` is accepted and ignored.

    ``dropout_p`` applies dropout to the probabilities (only when ``training``), which the fused kernel
    does not support; :class:`kernels.MultiheadSelfAttention` routes ``attn_drop > 0`` here.
    Scores beyond the dtype's range are handled as described in the module docstring.
    """
    out = attention_math(q, k, v, bias, scale, dropout_p, training)
    return recompute_if_overflowed(out, q, k, v, bias, scale, dropout_p, training)


def _overflow_checks_allowed(t: torch.Tensor) -> bool:
    """CPU tensors always; accelerator tensors only with ``KERNELS_CHECK_OVERFLOW=1`` (the check's host sync
    would stall the asynchronous GPU pipeline on every call); never while compiling, capturing or on meta."""
    if not host_checks_allowed(t):
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
    if not _overflow_checks_allowed(out) or not bool(torch.isnan(out.detach().sum())):
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
    wide = attention_math(q.double(), k.double(), v.double(), None if bias is None else bias.double(), scale,
                          dropout_p, training)
    return wide.to(out.dtype)


# ----------------------------------------------------------------------------------------------------------
# window attention


def window_scores(q, k, bias=None, window_mask=None, scale=None):
    """``scale q k^T + bias + window_mask[b mod nW]`` as [B*nW, H, N, N] (materialised: reference only)."""
    s = _attention_scores(q, k, bias, scale)
    if window_mask is not None:
        BW, H, N, _ = s.shape
        nW = window_mask.shape[0]
        s = (s.reshape(BW // nW, nW, H, N, N) + window_mask.unsqueeze(1)).reshape(BW, H, N, N)
    return s


def window_attention_probabilities(q, k, bias=None, window_mask=None, scale=None):
    """Row softmax of :func:`window_scores`; low-precision scores go through a float32 softmax (as eager)."""
    return _softmax(window_scores(q, k, bias, window_mask, scale))


def window_attention_reference(q, k, v, bias=None, window_mask=None, scale=None, dropout_p: float = 0.0,
                               training: bool = False):
    """Math path of window attention: [B*nW, H, N, d] in the promoted dtype of q and the bias.

    ``dropout_p`` drops attention probabilities while ``training`` (the fused kernel has no dropout).
    """
    p = window_attention_probabilities(q, k, bias, window_mask, scale)
    return _apply_probabilities(p, v, dropout_p, training)
