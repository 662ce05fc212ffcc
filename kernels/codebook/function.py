"""Nearest-codebook lookup (VQ-KD): validation, autograd and backend dispatch.

``nearest_code(z, codebook)`` returns ``(indices, z_q, best_similarity)``:

* ``z``: ``[..., d]`` (flattened to ``[M, d]`` internally), ``codebook``: ``[K, d]``.
* ``normalize=True`` (default, BEiT v2): cosine similarity. Both ``z`` and the codebook rows are
  l2-normalised (``x / max(||x||, eps)``) before the dot product. The codebook is *expected* to be
  l2-normalised already (the EMA update keeps it so); it is normalised again anyway (``K*d`` work), and
  ``z_q`` is the normalised row ``c_n[i]``.
* ``normalize=False``: Euclidean nearest code via the score ``2 <z, c> - ||c||^2`` (the constant ``||z||^2``
  is dropped, so ``best_similarity = ||z||^2 - ||z - c||^2``); ``z_q = c[i]`` unchanged.
* Ties resolve to the lowest code index (both backends).
* ``z_q`` is the straight-through tensor: its value is the chosen code row, its gradient is that of
  ``z_n`` (``z_q_st = z_n + (z_q - z_n).detach()``), so grad reaches ``z`` through the normalisation; the
  codebook never receives a gradient (it moves by EMA).
* dtypes: float16 / bfloat16 / float32 / float64. ``z_q`` has ``promote_types(z.dtype, codebook.dtype)``;
  ``best_similarity`` is float32 (float64 for float64 inputs) and is recomputed exactly (fp32/fp64) for
  the chosen code. ``precision`` sets the operand type of the score GEMM on the Triton path:
  ``"auto"`` (float64 -> fp64, float32 -> fp32 IEEE, bfloat16/float16 ``z`` -> that type with fp32
  accumulation), or force ``"ieee"``, ``"tf32"``, ``"bf16"``, ``"fp16"``. With reduced precision a
  near-tie can pick a code whose exact similarity is below the best by up to the rounding error.
* ``check_finite`` (default True) raises ``ValueError`` on NaN/inf in ``z`` or the codebook; it costs one
  reduction and a host sync, pass False in a hot loop once the inputs are known to be finite.
* Huge values (``|z|`` or ``|c|`` beyond ~1e19, where ``||x||^2`` overflows float32) give the right codes:
  rows are rescaled before squaring (cosine), and ``z`` and the codebook by one common power of two (L2);
  the L2 ``best_similarity`` is scaled back and is ``+-inf`` where its true value is beyond the dtype's range.

Memory: the Triton kernel never materialises the ``[M, K]`` scores, O(M*d + K*d).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels._backend import define_op, same_device_reasons, triton_reasons
from kernels.codebook import reference as ref

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PRECISIONS = ("auto", "ieee", "tf32", "bf16", "fp16")
MAX_TRITON_DIM = 256


class NearestCode(NamedTuple):
    indices: torch.Tensor
    z_q: torch.Tensor
    similarity: torch.Tensor


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, dims: int | None = None, float_only: bool = True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype_name(t.dtype)}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks (a host sync) run in eager mode on real tensors: not while compiling, not on meta tensors
    (no values; the ops then only propagate shapes and dtypes)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def check_real(name: str, value, lo=None, hi=None, lo_open=False):
    """A Python real number (not bool) within [lo, hi] ((lo, hi] with ``lo_open``); returns it as a float."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    below = (v <= lo if lo_open else v < lo) if lo is not None else False
    if v != v or below or (hi is not None and v > hi):
        if lo is None and hi is None:
            want = "be a number"
        elif hi is None:
            want = f"> {lo:g}" if lo_open else f">= {lo:g}"
        else:
            want = f"lie in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        if hi is None and lo is not None:
            want = f"be {want}"
        raise ValueError(f"{name} must {want} (not NaN), got {value}")
    return v


def check_int(name: str, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def check_finite_tensor(name: str, t: torch.Tensor):
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); expected finite values")


def validate_lookup(z, codebook, precision="auto", check_finite=True, eps=1e-12):
    check_tensor("z", z)
    check_tensor("codebook", codebook, dims=2)
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook is empty: expected shape [K, d] with K >= 1, got {tuple(codebook.shape)}")
    if codebook.shape[1] == 0:
        raise ValueError(f"codebook must have d >= 1 columns, got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"z must have shape [..., d] with d = codebook.shape[1] = {codebook.shape[1]}, "
            f"got {tuple(z.shape)}"
        )
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_real("eps", eps, 0.0, lo_open=True)
    if check_finite and host_checks_allowed(z):  # a host sync: skipped while compiling and on meta tensors
        check_finite_tensor("z", z)
        check_finite_tensor("codebook", codebook)


def resolve_precision(
    precision: str, z_dtype: torch.dtype, out_dtype: torch.dtype
) -> tuple[torch.dtype, str]:
    """(operand dtype of the score GEMM, tl.dot input_precision) for the Triton path."""
    if out_dtype == torch.float64:
        return torch.float64, "ieee"
    if precision == "auto":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(z_dtype, "ieee")
    return {
        "ieee": (torch.float32, "ieee"),
        "tf32": (torch.float32, "tf32"),
        "bf16": (torch.bfloat16, "ieee"),
        "fp16": (torch.float16, "ieee"),
    }[precision]


# ----------------------------------------------------------------------------------------------------------
# autograd (Triton path)


class NearestCodeFunction(torch.autograd.Function):
    """Fused lookup forward; backward is the straight-through gradient through the l2-normalisation.

    Backward maths (``n = ||z||``, ``g`` = upstream grad of ``z_q_st``)::

        n > eps :  dz = g / n - z * <z, g> / n^3
        n <= eps:  dz = g / eps                      (as F.normalize's clamp_min)
        normalize=False: dz = g
    """

    @staticmethod
    def forward(ctx, z2d, codebook, normalize, eps, precision):
        from kernels.codebook import triton_kernels as tk

        out_dtype = torch.promote_types(z2d.dtype, codebook.dtype)
        cdt = ref.compute_dtype(out_dtype)
        cb = ref.prepare_codebook(codebook, normalize, eps, cdt).contiguous()
        dot_dtype, input_precision = resolve_precision(precision, z2d.dtype, out_dtype)
        cb_dot = cb if dot_dtype == cdt else cb.to(dot_dtype)
        cb_sq = None if normalize else (cb * cb).sum(-1)
        idx, zq, sim = tk.nearest_code_forward(
            z2d, cb, cb_dot, cb_sq, normalize, eps, input_precision, out_dtype
        )
        ctx.normalize, ctx.eps, ctx.z_dtype = normalize, eps, z2d.dtype
        ctx.save_for_backward(z2d if normalize else None)
        ctx.mark_non_differentiable(idx, sim)
        return idx, zq, sim

    @staticmethod
    def backward(ctx, g_idx, g_zq, g_sim):
        if g_zq is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if not ctx.normalize:
            return g_zq.to(ctx.z_dtype), None, None, None, None
        from kernels.codebook import triton_kernels as tk

        (z2d,) = ctx.saved_tensors
        return tk.nearest_code_backward(z2d, g_zq, ctx.eps), None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# dispatch

nearest_code_op = define_op("nearest_code", "nearest codebook row (cosine or L2) + straight-through z_q")


def _triton_lookup_reasons(z2d, codebook, normalize, eps, precision):
    reasons = triton_reasons(z2d, codebook) + same_device_reasons(z=z2d, codebook=codebook)
    if codebook.shape[1] > MAX_TRITON_DIM:
        reasons.append(
            f"d={codebook.shape[1]} > {MAX_TRITON_DIM}: the Triton kernel keeps a row tile of z in registers"
        )
    return reasons


@nearest_code_op.register("triton", _triton_lookup_reasons)
def _nearest_code_triton(z2d, codebook, normalize, eps, precision):
    return NearestCodeFunction.apply(z2d, codebook, normalize, eps, precision)


@nearest_code_op.register("reference")
def _nearest_code_reference(z2d, codebook, normalize, eps, precision):
    return ref.nearest_code_reference(z2d, codebook, normalize, eps)


def nearest_code(
    z, codebook, normalize=True, *, eps=1e-12, precision="auto", check_finite=True
) -> NearestCode:
    """Nearest code of every row of ``z`` (see the module docstring for the maths and contract).

    Returns ``NearestCode(indices [...] int64, z_q [..., d] straight-through, similarity [...])`` where
    ``[...]`` is ``z.shape[:-1]``.
    """
    validate_lookup(z, codebook, precision, check_finite, eps)
    lead, d = z.shape[:-1], z.shape[-1]
    z2d = z.reshape(-1, d)
    if z2d.shape[0] == 0:
        out_dtype = torch.promote_types(z.dtype, codebook.dtype)
        return NearestCode(
            torch.empty(lead, dtype=torch.int64, device=z.device),
            z.to(out_dtype) * 0,
            torch.empty(lead, dtype=ref.compute_dtype(out_dtype), device=z.device),
        )
    if torch.compiler.is_compiling():  # one opaque custom op in the graph (kernels.library)
        from kernels._library.codebook import nearest_code as registered

        return registered(z, codebook, normalize, eps, precision, check_finite=False)  # checked above
    idx, zq, sim = nearest_code_op(z2d, codebook, bool(normalize), float(eps), precision)
    return NearestCode(idx.reshape(lead), zq.reshape(*lead, d), sim.reshape(lead))


def commitment_loss(z, z_q):
    """``mean((z - z_q.detach())^2)``: the VQ commitment term (gradient to ``z`` only).

    In BEiT v2 ``z`` is the l2-normalised encoder output and ``z_q`` the straight-through code.
    """
    check_tensor("z", z)
    check_tensor("z_q", z_q)
    if z.shape != z_q.shape:
        raise ValueError(f"z and z_q must have the same shape, got {tuple(z.shape)} and {tuple(z_q.shape)}")
    if z.device != z_q.device:
        raise ValueError(f"z and z_q must be on the same device, got {z.device} and {z_q.device}")
    return ref.commitment_loss_reference(z, z_q)
