"""Dense pure-PyTorch oracle of sparse convolution (the test reference and the last-resort fallback).

    out = F.conv2d(x * active_in, W, b, stride, padding, dilation, groups) * active_out

so inactive inputs never contribute, the bias appears only at active output sites and every inactive
output site is exactly zero. Its cost is the dense convolution's, whatever the density.
"""

from __future__ import annotations

import torch.nn.functional as F


def sparse_conv2d_reference(
    x, active_in, active_out, weight, bias=None, stride=1, padding=0, dilation=1, groups=1
):
    """``F.conv2d(x * active_in, weight, bias, ...) * active_out`` with bool maps ``[B, H, W]``/``[B, Ho, Wo]``."""
    xin = x * active_in.unsqueeze(1).to(x.dtype)
    out = F.conv2d(xin, weight, bias, stride, padding, dilation, groups)
    return out * active_out.unsqueeze(1).to(out.dtype)
