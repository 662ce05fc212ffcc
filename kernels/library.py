"""The kernels as ``torch.library`` custom ops (namespace ``ssl_kernels``), for ``torch.compile`` and export.

Registered ops (``torch.ops.ssl_kernels.<name>``), each with a fake (meta) implementation; the
differentiable ones have ``register_autograd`` whose backward calls the ``*_bwd`` op:

    attention_fwd / attention_bwd                     kernels.attention
    masked_token_scatter_fwd / _bwd                   kernels.masked_token_scatter
    gather_masked_fwd / _bwd                          kernels.gather_masked
    masked_cross_entropy_fwd                          kernels.masked_cross_entropy (grads made in the fwd)
    nearest_code_fwd / _bwd                           kernels.nearest_code
    codebook_ema_scatter, codebook_ema_finalize       kernels.ema_codebook_update (in place, no autograd)
    sparse_conv2d_fwd / _bwd                          kernels.sparse_conv2d
    window_attention_fwd / _bwd                       kernels.window_attention (Swin)

Routing. The functional APIs (``kernels.attention`` ...) call the registered ops **while compiling**
(``torch.compiler.is_compiling()``): Dynamo then sees one opaque node per op (no graph break, no tracing
into Triton launchers or the C++ extension), and Inductor fuses everything around it. In eager mode they
keep their direct path (the Triton ``autograd.Function`` on GPU, plain autograd on the reference), which
avoids the custom-op dispatch overhead. The op implementations select their backend at run time with the
same declarations (:mod:`kernels._backend`), so ``KERNELS_BACKEND`` / ``use_backend`` hold inside compiled
graphs. Data-dependent input checks (targets in range, finite values, per-row mask counts) need a host
sync and are skipped while compiling. The backward ops are not themselves differentiable (no double
backward), as in eager.

Importing this module registers every op; it imports neither triton nor ``kernels._C``.
"""

from __future__ import annotations

import torch

from kernels._library import NAMESPACE
from kernels.attn import attention as _attention
from kernels.attn import window_attention as _window_attention

attention = _attention.attention
from kernels.codebook import ema_codebook_update as _ema_codebook_update  # noqa: E402,F401 (its ops)
from kernels.codebook import nearest_code as _nearest_code  # noqa: E402
from kernels.masked import gather_masked as _gather_masked  # noqa: E402
from kernels.masked import masked_cross_entropy as _masked_cross_entropy  # noqa: E402
from kernels.masked import masked_token_scatter as _masked_token_scatter  # noqa: E402
from kernels.sparse_conv import sparse_conv2d as _sparse_conv2d  # noqa: E402

masked_token_scatter = _masked_token_scatter.masked_token_scatter
gather_masked = _gather_masked.gather_masked
masked_cross_entropy = _masked_cross_entropy.masked_cross_entropy
nearest_code = _nearest_code.nearest_code
sparse_conv2d = _sparse_conv2d.sparse_conv2d
window_attention = _window_attention.window_attention

# public op -> the custom ops that implement it
OPS: dict[str, tuple[str, ...]] = {
    "attention": ("attention_fwd", "attention_bwd"),
    "masked_token_scatter": ("masked_token_scatter_fwd", "masked_token_scatter_bwd"),
    "gather_masked": ("gather_masked_fwd", "gather_masked_bwd"),
    "masked_cross_entropy": ("masked_cross_entropy_fwd",),
    "nearest_code": ("nearest_code_fwd", "nearest_code_bwd"),
    "ema_codebook_update": ("codebook_ema_scatter", "codebook_ema_finalize"),
    "sparse_conv2d": ("sparse_conv2d_fwd", "sparse_conv2d_bwd"),
    "window_attention": ("window_attention_fwd", "window_attention_bwd"),
}


def registered_ops() -> dict[str, list[str]]:
    """``{public op: ["ssl_kernels::name", ...]}`` for every op above (all registered by importing this module)."""
    return {k: [f"{NAMESPACE}::{n}" for n in v] for k, v in OPS.items()}


def op(name: str):
    """The ``torch.ops.ssl_kernels.<name>`` packet, e.g. ``op("attention_fwd")``."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


__all__ = ["NAMESPACE", "OPS", "attention", "gather_masked", "masked_cross_entropy", "masked_token_scatter",
           "nearest_code", "op", "registered_ops", "sparse_conv2d", "window_attention"]
