"""Codebook usage statistics from a bincount of the assigned indices.

n_k = #{m : i_m = k},  p_k = n_k / sum(n)
fraction_used = #{k : n_k > 0} / K
perplexity    = exp(-sum_k p_k log p_k)      (0 log 0 = 0; equals K for a uniform assignment)
"""

from __future__ import annotations

import torch

from kernels._checks import check_tensor
from kernels.codebook import reference as ref


def codebook_usage(
    indices: torch.Tensor, num_codes: int, check_range: bool = True
) -> dict[str, torch.Tensor]:
    """``{"fraction_used", "perplexity"}`` as 0-d float64 tensors (no host sync; call ``.item()`` to log).

    ``check_range`` (default True) raises if an index is outside ``[0, num_codes)`` (one host sync; skipped on
    meta tensors, which have no values).
    """
    check_tensor("indices", indices)
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"indices must be an integer tensor (int64 expected), got {indices.dtype!s}")
    if not isinstance(num_codes, int) or isinstance(num_codes, bool) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    flat = indices.reshape(-1).long()
    checkable = check_range and flat.numel() and flat.device.type != "meta"
    if checkable and bool(((flat < 0) | (flat >= num_codes)).any()):
        raise ValueError(
            f"indices must lie in [0, num_codes={num_codes}), got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    if flat.device.type == "meta":  # shapes and dtypes only (bincount has no meta kernel)
        return {key: torch.empty((), dtype=torch.float64, device="meta")
                for key in ("fraction_used", "perplexity")}
    return ref.codebook_usage_reference(flat, num_codes)
