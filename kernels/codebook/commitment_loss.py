"""The VQ commitment term ``mean((z - z_q.detach())^2)`` (gradient to ``z`` only); plain PyTorch.

In BEiT v2 ``z`` is the l2-normalised encoder output and ``z_q`` the straight-through code of
:func:`kernels.nearest_code`.
"""

from __future__ import annotations

from kernels._checks import FLOAT_DTYPES, check_tensor
from kernels.codebook import reference as ref


def commitment_loss(z, z_q):
    """``mean((z - z_q.detach())^2)``: the VQ commitment term (gradient to ``z`` only)."""
    check_tensor("z", z, dtypes=FLOAT_DTYPES)
    check_tensor("z_q", z_q, dtypes=FLOAT_DTYPES)
    if z.shape != z_q.shape:
        raise ValueError(f"z and z_q must have the same shape, got {tuple(z.shape)} and {tuple(z_q.shape)}")
    if z.device != z_q.device:
        raise ValueError(f"z and z_q must be on the same device, got {z.device} and {z_q.device}")
    return ref.commitment_loss_reference(z, z_q)
