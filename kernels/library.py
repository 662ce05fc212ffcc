"""The kernels as ``torch.library`` custom ops (namespace ``ssl_kernels``), for ``torch.compile`` and export.

Every op module registers its custom ops once, with a fake (meta) implementation and, where differentiable,
``register_autograd`` (the pattern of :mod:`kernels._op`):

    attention_fwd / attention_bwd                     kernels/attn/attention.py
    window_attention_fwd / _bwd                       kernels/attn/window_attention.py (Swin)
    masked_token_scatter_fwd / _bwd                   kernels/masked/masked_token_scatter.py
    gather_masked_fwd / _bwd                          kernels/masked/gather_masked.py
    masked_cross_entropy_fwd                          kernels/masked/masked_cross_entropy.py (grads made in the fwd)
    nearest_code_fwd / _bwd                           kernels/codebook/nearest_code.py
    codebook_ema_scatter, codebook_ema_finalize       kernels/codebook/ema_codebook_update.py (in place)
    sparse_conv2d_fwd / _bwd                          kernels/sparse_conv/sparse_conv2d.py

Routing. The public functions (``kernels.attention`` ...) call their forward custom op **while compiling**:
Dynamo sees one opaque node per op (no graph break, no tracing into Triton launchers or the C++ extension) and
Inductor fuses around it. In eager mode they run the same forward, backward and autograd formula through a
plain ``autograd.Function`` (custom-op dispatch costs tens of microseconds a call; bench/test_bench_dispatch.py)
or, on the reference backend, the reference itself. The ops select their backend at run time with the same
declarations (:mod:`kernels._backend`), so ``KERNELS_BACKEND`` / ``use_backend`` hold inside compiled graphs.
Data-dependent input checks (targets in range, finite values, per-row mask counts) need a host sync and are
skipped while compiling. The backward ops are not themselves differentiable (no double backward), as in eager.
``masked_batch_norm`` has no custom op: compiled graphs trace its reference, whose reductions Inductor fuses.

``library.<op>`` is the public function itself (kept so that older imports work); ``op(name)`` gives the
registered ``torch.ops.ssl_kernels.<name>`` packet. Importing this module imports neither triton nor
``kernels._C``.
"""

from __future__ import annotations

import torch

from kernels._op import NAMESPACE
from kernels.attn import attention as _attention_module
from kernels.attn import window_attention as _window_attention_module
from kernels.codebook import ema_codebook_update as _ema_module  # noqa: F401 (registers its ops)
from kernels.codebook import nearest_code as _nearest_code_module
from kernels.masked import gather_masked as _gather_masked_module
from kernels.masked import masked_cross_entropy as _masked_cross_entropy_module
from kernels.masked import masked_token_scatter as _masked_token_scatter_module
from kernels.sparse_conv import sparse_conv2d as _sparse_conv2d_module

attention = _attention_module.attention
window_attention = _window_attention_module.window_attention
masked_token_scatter = _masked_token_scatter_module.masked_token_scatter
gather_masked = _gather_masked_module.gather_masked
masked_cross_entropy = _masked_cross_entropy_module.masked_cross_entropy
nearest_code = _nearest_code_module.nearest_code
sparse_conv2d = _sparse_conv2d_module.sparse_conv2d

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
