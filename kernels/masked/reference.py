"""Pure-PyTorch references for the masked-image-modelling ops (the oracle in tests, the CPU default).

``masked_token_scatter``  out[b, c+n] = (mask[b,n] ? mask_token : x[b,n]) + pos[n + c - s]
                          out[b, 0]   = cls_token + pos[0]        (when a cls token is prepended)
``gather_masked``         out[b*k + j] = h[b, n_j(b)], n_j(b) = the j-th masked position of row b
``masked_cross_entropy``  mean over non-ignored rows of  logsumexp(h W^T + b) - (h W^T + b)[target]

No triton import here. These run on any device and are differentiable through ordinary autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_scatter_reference(x, mask, mask_token, pos_embed=None, cls_token=None):
    """Replace masked rows of ``x`` by ``mask_token``, prepend ``cls_token``, add ``pos_embed``.

    Computed in ``x.dtype`` (parameters are cast to it), like an eager model under autocast would.
    ``pos_embed`` has N rows (added to the patch rows only) or N+1 rows (row 0 belongs to cls).
    """
    B, N, D = x.shape
    dt = x.dtype
    out = torch.where(mask.unsqueeze(-1), mask_token.to(dt).view(1, 1, D), x)
    if cls_token is not None:
        out = torch.cat([cls_token.to(dt).view(1, 1, D).expand(B, 1, D), out], dim=1)
    if pos_embed is not None:
        pos = pos_embed.reshape(-1, D).to(dt)
        if cls_token is not None and pos.shape[0] == N:
            out = torch.cat([out[:, :1], out[:, 1:] + pos.unsqueeze(0)], dim=1)
        else:
            out = out + pos.unsqueeze(0)
    return out


def masked_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] int64 positions of the first k masked entries of each row, in increasing order.

    Stable argsort of ``~mask`` (masked first, original order kept) -- no host synchronisation.
    """
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]


def gather_masked_reference(h, mask, num_masked=None):
    """[B, N, D] -> [M, D]: the masked rows in row-major order.

    With ``num_masked=k`` every row must hold exactly k masked positions; rows with fewer get NaN
    rows in the missing slots (same poisoning as the Triton kernel), rows with more keep their first k.
    Without it, boolean indexing (variable counts allowed; a host sync for the output size).
    """
    if num_masked is None:
        return h[mask]
    B, _N, D = h.shape
    k = int(num_masked)
    idx = masked_positions(mask, k)
    out = torch.gather(h, 1, idx.unsqueeze(-1).expand(B, k, D))
    count = mask.sum(dim=1, keepdim=True)
    valid = torch.arange(k, device=h.device).unsqueeze(0) < count
    out = torch.where(valid.unsqueeze(-1), out, torch.full((), float("nan"), dtype=h.dtype, device=h.device))
    return out.reshape(B * k, D)


def gather_targets(targets, mask, num_masked=None):
    """Select the targets of the masked positions with the same row-major order as ``gather_masked``."""
    if num_masked is None:
        return targets[mask]
    return torch.gather(targets, 1, masked_positions(mask, int(num_masked))).reshape(-1)


def compute_dtype(h, weight):
    """The GEMM dtype of masked_cross_entropy (both backends): the autocast dtype when autocast is on for the
    device (like ``nn.Linear`` under autocast), else ``promote_types(h.dtype, weight.dtype)``."""
    dev = h.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def masked_cross_entropy_rows_reference(h, weight, bias, targets, ignore_index=-100, return_accuracy=False,
                                        dtype=None):
    """masked_cross_entropy of pre-gathered rows: full logits, fp32 cross-entropy, mean over non-ignored rows
    (0 when there are none).

    h [M, D], weight [V, D], bias [V] or None, targets [M] int64. The GEMM runs in ``dtype``, by default
    :func:`compute_dtype` (every operand is cast to it, so mixed dtypes such as float64 ``h`` with a float32
    ``weight`` work).
    """
    dt = dtype or compute_dtype(h, weight)
    h, weight = h.to(dt), weight.to(dt)
    bias = None if bias is None else bias.to(dt)
    logits = F.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    n_valid = valid.sum().clamp_min(1).to(logits.dtype)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / n_valid
    if not return_accuracy:
        return loss
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == targets) & valid).sum().to(logits.dtype)
        acc = correct / n_valid
    return loss, acc


def masked_cross_entropy_reference(
    h, weight, bias, targets, mask=None, ignore_index=-100, return_accuracy=False, num_masked=None
):
    """Gather the masked rows of ``h``/``targets`` (if ``mask`` is given), then
    :func:`masked_cross_entropy_rows_reference`."""
    if mask is not None:
        h = gather_masked_reference(h, mask, num_masked)
        targets = gather_targets(targets, mask, num_masked)
    else:
        h = h.reshape(-1, h.shape[-1])
        targets = targets.reshape(-1)
    return masked_cross_entropy_rows_reference(h, weight, bias, targets, ignore_index, return_accuracy)
