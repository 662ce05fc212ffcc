"""Pure-PyTorch oracles of the sparse-convolution family (the test references and the last-resort fallbacks);
their backward is autograd's (:func:`kernels._op.reference_grads` recomputes it for the custom ops).

sparse_conv2d::

    out = F.conv2d(x * active_in, W, b, stride, padding, dilation, groups) * active_out

so inactive inputs never contribute, the bias appears only at active output sites and every inactive
output site is exactly zero. Its cost is the dense convolution's, whatever the density.

masked_batch_norm: batch-norm statistics over the active sites only (``m = active``, ``n = sum m``)::

    mean = sum m x / n    var = sum m (x - mean)^2 / n    y = m ((x - mean) / sqrt(var + eps) w + b)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_conv2d_reference(
    x, active_in, active_out, weight, bias=None, stride=1, padding=0, dilation=1, groups=1
):
    """``F.conv2d(x * active_in, weight, bias, ...) * active_out`` with bool maps ``[B, H, W]``/``[B, Ho, Wo]``."""
    xin = x * active_in.unsqueeze(1).to(x.dtype)
    out = F.conv2d(xin, weight, bias, stride, padding, dilation, groups)
    return out * active_out.unsqueeze(1).to(out.dtype)


def masked_batch_norm_reference(x, active, weight=None, bias=None, eps=1e-5):
    """Pure PyTorch (differentiable by autograd); statistics in fp32 for half inputs (fp64 for fp64).

    Returns ``(y, mean, var, n)``; the last three are detached."""
    cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xs, ms = x.to(cdt), active.unsqueeze(1).to(cdt)
    n = ms.sum()
    n_safe = n.clamp_min(1.0)
    mean = (xs * ms).sum(dim=(0, 2, 3)) / n_safe
    centred = (xs - mean[None, :, None, None]) * ms
    var = (centred * centred).sum(dim=(0, 2, 3)) / n_safe
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = centred * scale[None, :, None, None]
    if bias is not None:
        y = y + bias.to(cdt)[None, :, None, None] * ms
    return y.to(x.dtype), mean.detach(), var.detach(), n.detach()
