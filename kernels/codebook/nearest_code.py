"""nearest_code: the fused VQ-KD nearest-codebook lookup, one op (laid out as kernels/_op.py describes).

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
  codebook never receives a gradient (it moves by EMA). With ``n = ||z||`` and ``g`` the grad of ``z_q``::

      n > eps:  dz = g / n - z <z, g> / n^3        n <= eps:  dz = g / eps        normalize=False:  dz = g

* dtypes: float16 / bfloat16 / float32 / float64. ``z_q`` has ``promote_types(z.dtype, codebook.dtype)``;
  ``best_similarity`` is float32 (float64 for float64 inputs) and is recomputed exactly (fp32/fp64) for
  the chosen code. ``precision`` sets the operand type of the score GEMM on the Triton path:
  ``"auto"`` (float64 -> fp64; float32 -> ``"tf32x3"``; bfloat16/float16 ``z`` -> that type with fp32
  accumulation), or force ``"ieee"`` (fp32 FMA units), ``"tf32"`` (one TF32 tensor-core pass, 10-bit
  mantissas), ``"tf32x3"`` (three TF32 passes over the hi/lo split of both operands: ~2^-21 relative error
  per product, on tensor cores at 3x the MMAs of ``"tf32"``), ``"bf16"``, ``"fp16"``. Why ``tf32x3`` is the
  float32 default: the pick among near-ties depends on the score's rounding. One TF32 pass errs by up to
  ~2^-10 ||x|| ||c|| (1e-3 on cosine scores, where thousands of codes in 32 dims are often that close), so it
  changes many picks; ``tf32x3`` errs by ~1e-6, the order at which IEEE fp32 itself already departs from the
  exact argmax, at tensor-core speed. ``"ieee"`` stays for callers who want the FMA path. With any reduced
  precision a near-tie can pick a code whose exact similarity is below the best by up to the rounding error
  (``best_similarity`` is still exact for the pick); the tests therefore judge reduced-precision picks by the
  similarity value, not the index.
* ``cache_codebook`` (eager calls on the Triton path, cosine only, a buffer -- not a Parameter nor a tensor
  that requires grad): keep the prepared codebook (l2-normalised,
  cast, transposed: a handful of small launches per call otherwise) between calls, keyed on the codebook
  tensor itself (a weak reference), its ``data_ptr``, shape, strides, dtype and its autograd version counter
  ``_version``. Every in-place torch op on the codebook bumps ``_version`` (so does ``load_state_dict``), and
  this package's own writers -- the EMA update (whose kernels write through raw pointers), the k-means init,
  the dead-code restarts and the DDP broadcasts -- bump it explicitly
  (``torch.autograd.graph.increment_version``), so a stale entry is never read. A writer outside the version
  counter (``codebook.data.copy_(...)``, a raw kernel, NCCL) must bump it too, or pass
  ``cache_codebook=False`` (the default of this function; ``VectorQuantizer`` turns it on for its own buffer).
  Compiled graphs never use the cache.
* ``check_finite`` (default True) raises ``ValueError`` on NaN/inf in ``z`` or the codebook; it costs one
  reduction and a host sync, pass False in a hot loop once the inputs are known to be finite.
* Huge values (``|z|`` or ``|c|`` beyond ~1e19, where ``||x||^2`` overflows float32) give the right codes:
  rows are rescaled before squaring (cosine), and ``z`` and the codebook by one common power of two (L2);
  the L2 ``best_similarity`` is scaled back and is ``+-inf`` where its true value is beyond the dtype's range.

Memory: the Triton kernel never materialises the ``[M, K]`` scores, O(M*d + K*d).

Backends: ``triton`` (``nearest_code_triton.py``; CUDA tensors, CPU under ``TRITON_INTERPRET=1`` when forced)
and ``reference`` (``reference.nearest_code_reference``, chunked pure PyTorch, whose backward is autograd's).
Custom ops: ``ssl_kernels::nearest_code_fwd(z [M, d], codebook, normalize, eps, precision) -> (z_q, indices,
similarity)`` (z_q first, so that tooling that sums the outputs starts from a float tensor) and
``ssl_kernels::nearest_code_bwd(z, grad_zq, eps) -> grad_z`` (the Triton backward).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from kernels._backend import define_op, same_device_reasons, triton_reasons
from kernels._checks import (
    FLOAT_DTYPES,
    acc_dtype,
    check_finite_tensor,
    check_real,
    check_tensor,
    host_checks_allowed,
)
from kernels._op import custom_op, eager_function, reference_grads
from kernels.codebook import reference as ref

PRECISIONS = ("auto", "ieee", "tf32", "tf32x3", "bf16", "fp16")
MAX_TRITON_DIM = 256


class NearestCode(NamedTuple):
    indices: Tensor
    z_q: Tensor
    similarity: Tensor


# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class NearestCodeInputs:
    """Checked arguments: ``z`` as ``[M, d]`` (any strides), ``codebook [K, d]``."""

    z: Tensor
    codebook: Tensor
    normalize: bool
    eps: float
    precision: str

    @property
    def args(self) -> tuple:
        return (self.z, self.codebook, self.normalize, self.eps, self.precision)


def validate(z, codebook, normalize=True, eps=1e-12, precision="auto", check_finite=True) -> NearestCodeInputs:
    check_tensor("z", z, dtypes=FLOAT_DTYPES)
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES)
    K, d = codebook.shape
    if K == 0:
        raise ValueError(f"codebook is empty: expected shape [K, d] with K >= 1, got {tuple(codebook.shape)}")
    if d == 0:
        raise ValueError(f"codebook must have d >= 1 columns, got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != d:
        raise ValueError(f"z must have shape [..., d] with d = codebook.shape[1] = {d}, got {tuple(z.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    eps = check_real("eps", eps, 0.0, lo_open=True)
    if check_finite and host_checks_allowed(z):  # a host sync: skipped while compiling and on meta tensors
        check_finite_tensor("z", z)
        check_finite_tensor("codebook", codebook)
    return NearestCodeInputs(z.reshape(-1, d), codebook, bool(normalize), eps, precision)


def resolve_precision(precision: str, z_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """(operand dtype of the score GEMM, tl.dot input_precision) for the Triton path."""
    if out_dtype == torch.float64:
        return torch.float64, "ieee"
    if precision == "auto":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(z_dtype, "tf32x3")
    return {
        "ieee": (torch.float32, "ieee"),
        "tf32": (torch.float32, "tf32"),
        "tf32x3": (torch.float32, "tf32x3"),
        "bf16": (torch.bfloat16, "ieee"),
        "fp16": (torch.float16, "ieee"),
    }[precision]


# ----------------------------------------------------------------------------------------------------------
# backends (each returns (z_q, indices, similarity), the custom op's order)

OP = define_op("nearest_code", doc="nearest codebook row (cosine or L2) + straight-through z_q")


def _triton_not_supported(i: NearestCodeInputs) -> list[str]:
    reasons = triton_reasons(i.z, i.codebook) + same_device_reasons(z=i.z, codebook=i.codebook)
    if i.codebook.shape[1] > MAX_TRITON_DIM:
        reasons.append(
            f"d={i.codebook.shape[1]} > {MAX_TRITON_DIM}: the Triton kernel keeps a row tile of z in registers"
        )
    return reasons


class PreparedCache:
    """The prepared codebooks of recent eager lookups, one entry per codebook tensor (see ``cache_codebook`` in
    the module docstring). An entry is used only when the same tensor object (weak reference: a new tensor at
    a freed address never matches) has the same ``data_ptr``, layout, dtype, version counter and lookup
    arguments; anything else rebuilds it."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self.entries: dict[int, tuple] = {}
        self.builds = 0  # how many times an entry was (re)built: the tests' probe

    @staticmethod
    def key(codebook: Tensor, *args) -> tuple:
        return (codebook._version, codebook.data_ptr(), tuple(codebook.shape), codebook.stride(), codebook.dtype,
                codebook.device, *args)

    def get(self, codebook: Tensor, args: tuple, build):
        k = self.key(codebook, *args)
        ent = self.entries.get(id(codebook))
        if ent is not None and ent[0]() is codebook and ent[1] == k:
            return ent[2]
        value = build()
        self.builds += 1
        if len(self.entries) >= self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        cid = id(codebook)
        self.entries.pop(cid, None)
        ref_ = weakref.ref(codebook, lambda r, cid=cid: self._drop(cid, r))
        self.entries[cid] = (ref_, k, value)
        return value

    def _drop(self, cid: int, ref_) -> None:
        ent = self.entries.get(cid)
        if ent is not None and ent[0] is ref_:
            del self.entries[cid]

    def clear(self) -> None:
        self.entries.clear()


PREPARED = PreparedCache()
_CACHE_ON = contextvars.ContextVar("nearest_code_cache", default=False)


@contextlib.contextmanager
def _cache_enabled(on: bool):
    token = _CACHE_ON.set(on)
    try:
        yield
    finally:
        _CACHE_ON.reset(token)


def _cacheable(codebook: Tensor, normalize: bool) -> bool:
    return (_CACHE_ON.get() and normalize and not codebook.is_inference()
            and not torch.compiler.is_compiling() and not isinstance(codebook, torch.nn.Parameter)
            and not codebook.requires_grad)


@OP.register("triton", _triton_not_supported)
def _forward_triton(i: NearestCodeInputs) -> tuple[Tensor, Tensor, Tensor]:
    from kernels.codebook.nearest_code_triton import nearest_code_forward, prepare_codebook

    out_dtype = torch.promote_types(i.z.dtype, i.codebook.dtype)
    dot_dtype, input_precision = resolve_precision(i.precision, i.z.dtype, out_dtype)
    args = (i.normalize, i.eps, dot_dtype, out_dtype)
    if _cacheable(i.codebook, i.normalize):
        prep = PREPARED.get(i.codebook, args, lambda: prepare_codebook(i.codebook, *args))
    else:
        prep = prepare_codebook(i.codebook, *args)
    idx, zq, sim = nearest_code_forward(i.z, prep, i.normalize, i.eps, input_precision, out_dtype)
    return zq, idx, sim


@OP.register("reference")
def _forward_reference(i: NearestCodeInputs) -> tuple[Tensor, Tensor, Tensor]:
    idx, zq, sim = ref.nearest_code_reference(i.z, i.codebook, i.normalize, i.eps)
    return zq, idx, sim


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(z: Tensor, codebook: Tensor, normalize: bool, eps: float,
             precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """(z_q [M, d] in promote(z, codebook), indices int64 [M], similarity [M] float32 / float64)."""
    i = NearestCodeInputs(z, codebook, normalize, eps, precision)
    zq, idx, sim = OP.select(i).fn(i)
    return zq.contiguous(), idx, sim


def _backward_kernels(z: Tensor, grad_zq: Tensor, eps: float) -> Tensor:
    """The Triton backward: the straight-through gradient through ``l2n(z)``, in z's dtype, contiguous."""
    from kernels.codebook.nearest_code_triton import nearest_code_backward

    return nearest_code_backward(z, grad_zq, eps)


def _setup_context(ctx, inputs, output):
    z, codebook, normalize, eps, precision = inputs
    zq, idx, sim = output
    ctx.backend = OP.select(NearestCodeInputs(*inputs)).backend
    if ctx.backend == "reference":  # not the codebook: the EMA update may change it before the backward
        ctx.save_for_backward(z, zq)
    else:
        ctx.save_for_backward(z if normalize else None)
    ctx.normalize, ctx.eps, ctx.z_dtype = normalize, eps, z.dtype
    ctx.mark_non_differentiable(idx, sim)


def _grads(bwd, ctx, grad_zq, _grad_idx, _grad_sim):
    if grad_zq is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    if ctx.backend == "reference":  # autograd over the reference's straight-through z_q (z only, never the codebook)
        gz, _ = reference_grads(ref.straight_through_reference, ctx.saved_tensors, (True, False), (grad_zq,),
                                normalize=ctx.normalize, eps=ctx.eps)
        return gz, None, None, None, None
    if not ctx.normalize:
        return grad_zq.to(ctx.z_dtype), None, None, None, None
    (z,) = ctx.saved_tensors
    return bwd(z, grad_zq, ctx.eps), None, None, None, None


fwd_op = custom_op("nearest_code_fwd", _forward)
bwd_op = custom_op("nearest_code_bwd", _backward_kernels)


@fwd_op.register_fake
def _(z, codebook, normalize, eps, precision):
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    M, d = z.shape
    return (z.new_empty((M, d), dtype=out_dtype), z.new_empty((M,), dtype=torch.int64),
            z.new_empty((M,), dtype=acc_dtype(out_dtype)))


@bwd_op.register_fake
def _(z, grad_zq, eps):
    return z.new_empty(z.shape)


fwd_op.register_autograd(functools.partial(_grads, bwd_op), setup_context=_setup_context)
NearestCodeFunction = eager_function("NearestCodeFunction", _forward, _setup_context,
                                     functools.partial(_grads, _backward_kernels))


# ----------------------------------------------------------------------------------------------------------
# public API


def nearest_code(z, codebook, normalize=True, *, eps=1e-12, precision="auto", check_finite=True,
                 cache_codebook=False) -> NearestCode:
    """Nearest code of every row of ``z`` (see the module docstring for the maths and contract).

    Returns ``NearestCode(indices [...] int64, z_q [..., d] straight-through, similarity [...])`` where
    ``[...]`` is ``z.shape[:-1]``.
    """
    i = validate(z, codebook, normalize, eps, precision, check_finite)
    lead, d = z.shape[:-1], z.shape[-1]
    if i.z.shape[0] == 0:
        out_dtype = torch.promote_types(z.dtype, codebook.dtype)
        return NearestCode(
            torch.empty(lead, dtype=torch.int64, device=z.device),
            z.to(out_dtype) * 0,
            torch.empty(lead, dtype=acc_dtype(out_dtype), device=z.device),
        )
    if torch.compiler.is_compiling():  # one opaque custom op in the graph
        zq, idx, sim = fwd_op(*i.args)
    else:
        impl = OP.select(i)
        if impl.backend == "reference":
            zq, idx, sim = impl.fn(i)
        else:
            with OP.pinned(impl), _cache_enabled(bool(cache_codebook)):
                zq, idx, sim = NearestCodeFunction.apply(*i.args)
    return NearestCode(idx.reshape(lead), zq.reshape(*lead, d), sim.reshape(lead))
