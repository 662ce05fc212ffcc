"""CUDA correctness of every kernel at the real (paper) shapes, against the references.

Run on a GPU machine with ``python -m pytest tests/test_gpu_real_shapes.py --device cuda`` (the GPU plan,
``python -m bench.gpu``, runs it as its second step); every test here is marked ``cuda`` and skips without
``--device cuda``. ``GPU_PLAN_DRY_RUN=1`` (``python -m bench.gpu --dry-run``) runs the same tests on the CPU with
tiny shapes and the Triton interpreter, so that this file cannot rot unseen.

What this adds to the small-shape CUDA tests of each op: the launch configurations the real shapes select
(every autotune config of the codebook lookup, the attention tiles for d = 32/64/128, N = 37..1024, Swin's
window attention at the Swin-B stages, the
IEEE and TF32 fp32 paths), the tensor-core dots inside the sparse convolution's data-dependent branch,
``torch.addmm(out_dtype=fp32)`` of the chunked cross-entropy, the multi-pass softmax (V = 65536), the atomics
of the shared-bias dbias and of the codebook scatter.

How results are compared:

* against a float64 reference, with the error allowed to be a few times that of torch's own computation in
  the same precision (``assert_like_torch``): tensor-core accumulation orders differ, so fixed tolerances at
  these sizes would be either loose or flaky;
* nearest-code picks by similarity (the best code's similarity minus the picked one's), never by index:
  near-ties flip with the accumulation order;
* the EMA update's atomics are checked against the reference with a tolerance, never bitwise; attention's
  dbias (no atomics since the batch-grouped backward; "shared-atomic" is the default-mode case) is checked
  bitwise between two runs in both modes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.shapes import SPARK_CONV_LAYERS as LAYERS  # (Cin, Cout, kernel, stride, depthwise, input stride)
from kernels import use_backend

DRY = os.environ.get("GPU_PLAN_DRY_RUN", "") not in ("", "0")
pytestmark = [] if DRY else [pytest.mark.cuda]

# unit roundoff of each precision (TF32: a 10-bit mantissa)
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, "tf32": 2.0**-11}


def sized(real, tiny):
    return tiny if DRY else real


@pytest.fixture(autouse=True)
def _on_the_right_device(device):
    if not DRY and device.type != "cuda":
        pytest.skip("needs --device cuda")
    yield


def _max_err(a, exact):
    return (a.detach().double() - exact.detach().double()).abs().max().item()


def assert_like_torch(name, ours, lowp, exact, eps, factor=4.0):
    """``ours`` within ``factor`` x the error of torch's own low-precision result (``lowp``) w.r.t. the float64
    ``exact``, plus a floor of a few units of roundoff of the largest value."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    o, e = ours.detach().double(), exact.detach().double()
    bad = ~torch.isfinite(o) & torch.isfinite(e)
    assert not bad.any(), f"{name}: non-finite values at {bad.nonzero()[:5].tolist()}"
    err = (o - e).abs().max().item()
    ref_err = _max_err(lowp, e) if lowp is not None else 0.0
    floor = 4 * eps * max(e.abs().max().item(), 1e-30)
    assert err <= factor * ref_err + floor, (
        f"{name}: max |ours - fp64| = {err:.3g} > {factor} x torch's {ref_err:.3g} + {floor:.3g}"
    )


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


# ------------------------------------------------------------------------------------------------------------
# attention: FlashAttention-style forward/backward with a learnable bias

ALL_BIAS = ("shared-atomic", "shared-deterministic", "per-batch", "none")
ATT_CASES = sized(
    [  # (name, B, H, N, d, dtype, precision, bias kinds) -- precision: torch.set_float32_matmul_precision (fp32)
        # every bias mode at the BEiT shape; the tile variants (d, N, dtype) with the bias they meet in training
        ("vitb-bf16", 4, 12, 197, 64, torch.bfloat16, None, ALL_BIAS),
        ("vitb-fp16", 4, 12, 197, 64, torch.float16, None, ("shared-atomic",)),
        ("vitb-fp32-ieee", 2, 12, 197, 64, torch.float32, "highest", ("shared-atomic",)),
        ("vitb-fp32-tf32", 2, 12, 197, 64, torch.float32, "high", ("shared-atomic", "none")),
        ("d32-fp16", 4, 8, 197, 32, torch.float16, None, ("shared-atomic",)),
        ("d128-bf16", 2, 6, 197, 128, torch.bfloat16, None, ("shared-atomic",)),
        ("d128-fp32-tf32", 2, 6, 197, 128, torch.float32, "high", ("none",)),
        ("dino-local-n37", 16, 6, 37, 64, torch.bfloat16, None, ("none",)),
        ("dino-local-n50", 16, 6, 50, 64, torch.bfloat16, None, ("none",)),
        ("long-n1024", 1, 4, 1024, 64, torch.bfloat16, None, ("shared-atomic",)),
    ],
    [
        ("vitb-bf16", 2, 2, 37, 16, torch.bfloat16, None, ALL_BIAS),
        ("vitb-fp32-ieee", 1, 2, 21, 16, torch.float32, "highest", ("shared-atomic",)),
    ],
)
ATT_PARAMS = [pytest.param(c[:7], kind, id=f"{c[0]}-{kind}") for c in ATT_CASES for kind in c[7]]


def _attention_run(q, k, v, bias, deterministic, backend, g):
    leaves = [t for t in (q, k, v, bias) if t is not None]
    with use_backend(backend, op="attention"):
        out = kernels.attention(q, k, v, bias, deterministic=deterministic)
    return (out, *_grads(out, leaves, g.to(out.dtype)))


@pytest.mark.parametrize("case,bias_kind", ATT_PARAMS)
def test_attention_real_shapes(device, case, bias_kind):
    name, B, H, N, d, dtype, precision = case
    if bias_kind == "per-batch" and B * H * N * N > 2**26:
        pytest.skip("per-batch bias of this size: covered at the smaller shapes")
    old = torch.get_float32_matmul_precision()
    if precision:
        torch.set_float32_matmul_precision(precision)
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        bias = None
        if bias_kind != "none":
            shape = (B, H, N, N) if bias_kind == "per-batch" else (H, N, N)
            bias = (torch.randn(shape, generator=g) * 0.5).to(device).requires_grad_()
        det = bias_kind == "shared-deterministic"
        gout = torch.randn(B, H, N, d, generator=g).to(device, dtype)  # the upstream gradient, in q's dtype
        got = _attention_run(q, k, v, bias, det, "triton", gout)
        exact = _attention_run(*(t.detach().double().requires_grad_() if t is not None else None
                                 for t in (q, k, v, bias)), False, "reference", gout)
        tf32 = dtype == torch.float32 and precision == "high"
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32  # torch's own fp32 result at the same precision
        try:
            lowp = _attention_run(q, k, v, bias, False, "reference", gout)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        eps = EPS["tf32"] if tf32 else EPS[dtype]
        names = ["out", "dq", "dk", "dv", "dbias"]
        for n, a, lo, e in zip(names, got, lowp, exact):
            assert a.dtype == (torch.float32 if n == "dbias" else dtype), (n, a.dtype)
            assert_like_torch(f"{name} {bias_kind} {n}", a, lo, e, eps)
        if bias_kind.startswith("shared"):
            # a second run, bitwise in both modes: the backward has no atomics (the batch-grouped dK/dV kernel
            # sums dbias in a fixed order; at N=197 through its read-add-write band in global memory, which this
            # is the only check of on real hardware)
            again = _attention_run(q, k, v, bias, det, "triton", gout)
            assert torch.equal(again[-1], got[-1]), f"{name} {bias_kind}: dbias differs between two runs"
    finally:
        torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------------------------------------------------
# Swin window attention: the whole N x N window per program, fused backward (dbias without atomics)

WIN_CASES = sized(
    [  # (name, images, nW, H, N, d, shifted, dtype): Swin-B stages at 192 px / window 6 and 224 px / window 7
        ("swinb192-s1", 2, 64, 4, 36, 32, True, torch.bfloat16),
        ("swinb192-s1", 2, 64, 4, 36, 32, True, torch.float16),
        ("swinb192-s1", 2, 64, 4, 36, 32, True, torch.float32),
        ("swinb192-s3", 4, 4, 16, 36, 32, True, torch.bfloat16),
        ("swinb192-s4", 16, 1, 32, 36, 32, False, torch.bfloat16),
        ("swinb224-s1", 2, 64, 4, 49, 32, True, torch.bfloat16),
        ("swinb224-s2", 2, 16, 8, 49, 32, True, torch.float32),
    ],
    [("swinb192-s1", 2, 4, 2, 36, 16, True, torch.bfloat16), ("swinb224-s4", 2, 1, 2, 49, 16, False, torch.float32)],
)


def _window_run(q, k, v, bias, mask, g, backend):
    leaves = [q, k, v, bias]
    with use_backend(backend, op="window_attention"):
        out = kernels.window_attention(q, k, v, bias, mask)
    return (out, *_grads(out, leaves, g.to(out.dtype)))


@pytest.mark.parametrize("case", WIN_CASES, ids=[f"{c[0]}-{str(c[7])[6:]}" for c in WIN_CASES])
def test_window_attention_real_shapes(device, case):
    name, images, nW, H, N, d, shifted, dtype = case
    BW = images * nW
    g = torch.Generator(device="cpu").manual_seed(10)
    qkv = torch.randn(BW, N, 3, H, d, generator=g).to(device, dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # views of one qkv
    bias = (torch.randn(H, N, N, generator=g) * 0.5).to(device).requires_grad_()  # fp32, as under autocast
    mask = None
    if shifted:
        mask = torch.where(torch.rand(nW, N, N, generator=g) < 0.3, -100.0, 0.0).to(device)
    gout = torch.randn(BW, H, N, d, generator=g).to(device, dtype)
    got = _window_run(q, k, v, bias, mask, gout, "triton")
    exact = _window_run(*(t.detach().double().requires_grad_() for t in (q, k, v, bias)),
                        None if mask is None else mask.double(), gout, "reference")
    lowp = _window_run(q, k, v, bias, mask, gout, "reference")
    for n, a, lo, e in zip(("out", "dq", "dk", "dv", "dbias"), got, lowp, exact):
        assert_like_torch(f"{name} {n}", a, lo, e, EPS[dtype])
    again = _window_run(q, k, v, bias, mask, gout, "triton")
    assert torch.equal(again[-1], got[-1]), "window attention dbias (no atomics) differs between two runs"


# ------------------------------------------------------------------------------------------------------------
# VQ-KD codebook: every autotune config of the fused lookup, the EMA update's atomics

CB_SHAPE = sized((50_176, 8192, 32), (300, 96, 32))


class _OneConfig:
    """Stands in for the autotuned launcher: launches the plain kernel with one config of the autotuner."""

    def __init__(self, kernel, cfg):
        self.kernel, self.cfg = kernel, cfg

    def __getitem__(self, grid):
        def launch(*args, **meta):
            kw = dict(self.cfg.kwargs)
            g = grid(kw) if callable(grid) else grid
            return self.kernel[g](*args, **meta, **kw, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)

        return launch


def _lookup_inputs(dtype, device, normalize=True):
    M, K, d = CB_SHAPE
    g = torch.Generator(device="cpu").manual_seed(1)
    cb = torch.randn(K, d, generator=g)
    cb = F.normalize(cb, dim=-1) if normalize else cb
    z = torch.randn(M, d, generator=g)
    return z.to(device, dtype), cb.to(device)


def _check_picks(z, cb, idx, zq, sim, normalize, tol):
    """By similarity: the picked code's exact score is within ``tol`` of the best one; z_q is that code;
    the returned similarity is the picked code's, recomputed exactly."""
    zd, cd = z.double(), cb.double()
    if normalize:
        zd, cd = F.normalize(zd, dim=-1), F.normalize(cd, dim=-1)
    sq = (cd * cd).sum(-1)
    best = torch.empty(zd.shape[0], dtype=torch.float64, device=z.device)
    for s in range(0, zd.shape[0], 4096):
        scores = zd[s:s + 4096] @ cd.t()
        best[s:s + 4096] = (scores if normalize else 2 * scores - sq).max(dim=1).values
    picked = (zd * cd[idx]).sum(-1)
    if not normalize:
        picked = 2 * picked - sq[idx]
    scale = 1.0 if normalize else max(best.abs().max().item(), 1.0)
    gap = (best - picked).max().item()
    assert gap <= tol * scale, f"picked codes up to {gap:.3g} below the best similarity (tol {tol * scale:.3g})"
    assert (sim.double() - picked).abs().max().item() <= 1e-4 * scale, "similarity is not the picked code's"
    want_zq = F.normalize(cb.float(), dim=-1)[idx] if normalize else cb.float()[idx]
    assert (zq.float() - want_zq).abs().max().item() <= 1e-6, "z_q is not the picked code row"


LOOKUP_CASES = [  # (dtype, precision, tolerance on the similarity gap)
    (torch.float32, "auto", 1e-5),  # IEEE fp32 dots
    (torch.float32, "tf32", 1e-2),
    (torch.bfloat16, "auto", 3e-2),  # bf16 operands, fp32 accumulation
]


@pytest.mark.parametrize("dtype,precision,tol", LOOKUP_CASES, ids=["fp32-ieee", "fp32-tf32", "bf16"])
def test_nearest_code_every_autotune_config(device, monkeypatch, dtype, precision, tol):
    from kernels.codebook import nearest_code_triton as tk

    z, cb = _lookup_inputs(dtype, device)
    configs = tk._lookup_configs()
    if DRY:
        configs = configs[:2]  # the interpreter launches the plain kernel anyway
    for cfg in configs:
        # the launcher asks lookup_autotuner(tensor_cores, precision, capability) for its kernel on CUDA
        monkeypatch.setattr(tk, "lookup_autotuner", lambda *a, _c=cfg: _OneConfig(tk._nearest_code_fwd_kernel, _c))
        with use_backend("triton", op="nearest_code"):
            idx, zq, sim = kernels.nearest_code(z, cb, precision=precision, check_finite=False)
        try:
            _check_picks(z, cb, idx, zq, sim, True, tol)
        except AssertionError as exc:
            raise AssertionError(f"config {cfg}: {exc}") from None


@pytest.mark.parametrize("dtype,normalize", [(torch.float16, True), (torch.float32, False), (torch.bfloat16, False)],
                         ids=["fp16-cosine", "fp32-l2", "bf16-l2"])
def test_nearest_code_autotuned_and_backward(device, dtype, normalize):
    z, cb = _lookup_inputs(dtype, device, normalize)
    z = z.requires_grad_()
    with use_backend("triton", op="nearest_code"):
        idx, zq, sim = kernels.nearest_code(z, cb, normalize=normalize, check_finite=False)
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype]
    _check_picks(z.detach(), cb, idx, zq, sim, normalize, tol)
    g = torch.randn_like(zq)
    (gz,) = torch.autograd.grad(zq, z, g)
    z64 = z.detach().double().requires_grad_()
    zn = F.normalize(z64, dim=-1) if normalize else z64  # the straight-through gradient goes through z_n
    (want,) = torch.autograd.grad(zn, z64, g.double())
    assert gz.dtype == dtype
    (lowp,) = torch.autograd.grad(F.normalize(z.float(), dim=-1) if normalize else z.float(), z, g.float())
    assert_like_torch("grad z", gz, lowp.to(dtype), want, EPS[dtype])


def test_ema_update_real_shape_atomics(device):
    M, K, d = CB_SHAPE
    g = torch.Generator(device="cpu").manual_seed(2)
    cb0 = F.normalize(torch.randn(K, d, generator=g), dim=-1).to(device)
    z = torch.randn(M, d, generator=g).to(device)
    idx = torch.randint(0, K, (M,), generator=g).to(device)

    def run(backend):
        cb, cl, es = cb0.clone(), torch.ones(K, device=device), torch.zeros(K, d, device=device)
        with use_backend(backend):
            counts = kernels.ema_codebook_update(cb, cl, es, z, idx, decay=0.99)
        return cb, cl, es, counts

    want = run("reference")
    for attempt in range(2):  # atomics: the sums' rounding depends on arrival order, run to run
        got = run("triton")
        for n, a, e in zip(("codebook", "cluster_size", "embed_sum", "counts"), got, want):
            atol = 0.0 if n in ("cluster_size", "counts") and not DRY else 2e-5
            assert (a - e).abs().max().item() <= atol + 1e-6 * e.abs().max().item(), (attempt, n)


# ------------------------------------------------------------------------------------------------------------
# masked image modelling: scatter, gather, chunked linear cross-entropy

MIM = sized({"B": 8, "N": 196, "D": 768, "k": 75, "V": 8192}, {"B": 2, "N": 16, "D": 32, "k": 6, "V": 64})
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]


def _mim_mask(B, N, k, device):
    g = torch.Generator(device="cpu").manual_seed(3)
    return (torch.rand(B, N, generator=g).argsort(dim=1) < k).to(device)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_masked_token_scatter_and_gather_real_shapes(device, dtype):
    from kernels.masked.reference import gather_masked_reference, masked_token_scatter_reference

    B, N, D, k = MIM["B"], MIM["N"], MIM["D"], MIM["k"]
    mask = _mim_mask(B, N, k, device)
    x = torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True)
    tok, cls = (torch.randn(D, device=device, requires_grad=True) for _ in range(2))
    pos = torch.randn(N + 1, D, device=device, requires_grad=True)
    inputs = [x, tok, pos, cls]
    with use_backend("triton"):
        out = kernels.masked_token_scatter(x, mask, tok, pos, cls)
    r64_in = [_f64(t) for t in inputs]
    ref64 = masked_token_scatter_reference(r64_in[0], mask, r64_in[1], r64_in[2], r64_in[3])
    lowp = masked_token_scatter_reference(x, mask, tok, pos, cls)  # computed in x's dtype
    assert out.dtype == dtype
    assert_like_torch("scatter out", out, lowp, ref64, EPS[dtype], factor=1.5)
    g = torch.randn_like(out)
    got = _grads(out, inputs, g)
    want = _grads(ref64, r64_in, g.double())
    low = _grads(lowp, inputs, g)
    for n, a, lo, e in zip(("grad_x", "grad_tok", "grad_pos", "grad_cls"), got, low, want):
        assert_like_torch(f"scatter {n}", a, lo, e, EPS[dtype])

    # gather of the masked rows of a strided view (the trainer's h[:, 1:]): a pure copy, so exact
    full = torch.randn(B, N + 1, D, device=device, dtype=dtype, requires_grad=True)
    h = full[:, 1:]
    with use_backend("triton"):
        rows = kernels.gather_masked(h, mask, num_masked=k)
    assert torch.equal(rows, gather_masked_reference(h.detach(), mask, k))
    gr = torch.randn_like(rows)
    (gh,) = torch.autograd.grad(rows, full, gr)
    (gh_ref,) = torch.autograd.grad(gather_masked_reference(h, mask, k), full, gr)
    assert torch.equal(gh, gh_ref)


@pytest.mark.parametrize("chunk_rows", [None, 128], ids=["one-chunk", "chunks-of-128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_masked_cross_entropy_real_shapes(device, dtype, chunk_rows):
    from kernels.masked import masked_cross_entropy_triton as ce_triton
    from kernels.masked.reference import masked_cross_entropy_reference

    B, N, D, k, V = (MIM[n] for n in ("B", "N", "D", "k", "V"))
    g = torch.Generator(device="cpu").manual_seed(4)
    h = torch.randn(B, N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (B, N), generator=g).to(device)
    mask = _mim_mask(B, N, k, device)
    inputs = [h, w, b]
    with use_backend("triton"):
        loss = kernels.masked_cross_entropy(h, w, b, t, mask, num_masked=k, chunk_rows=chunk_rows)
    r64_in = [_f64(x) for x in inputs]
    r64 = masked_cross_entropy_reference(*r64_in, t, mask, num_masked=k)
    lowp = masked_cross_entropy_reference(h, w, b, t, mask, num_masked=k)
    rel = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}[dtype]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - r64.item()) <= rel * abs(r64.item()) + 1e-6, (loss.item(), r64.item())
    got = _grads(loss, inputs, None)
    want = _grads(r64, r64_in, None)
    low = _grads(lowp, inputs, None)
    for n, a, lo, e in zip(("grad_h", "grad_W", "grad_b"), got, low, want):
        assert a.dtype == dtype
        assert_like_torch(f"CE {n}", a, lo, e, EPS[dtype])
    if device.type == "cuda" and dtype != torch.float32:
        # grad_W accumulates over chunks with torch.addmm(..., out_dtype=fp32) where torch has it
        assert ce_triton._OUT_DTYPE_MM is not None


def test_ce_addmm_out_dtype_path(device):
    """The fp32-accumulating GEMM of grad_W: ``torch.addmm(acc, a, b, out_dtype=fp32)`` (bf16 a, b)."""
    from kernels.masked import masked_cross_entropy_triton as ce_triton

    if device.type != "cuda":
        pytest.skip("addmm(out_dtype=) is the CUDA path; the dry run has nothing to check here")
    a = torch.randn(4096, 600, device=device, dtype=torch.bfloat16)
    bm = torch.randn(600, 776, device=device, dtype=torch.bfloat16)
    acc = torch.randn(4096, 776, device=device)
    want = acc.double() + a.double() @ bm.double()
    old = ce_triton._OUT_DTYPE_MM
    ce_triton._OUT_DTYPE_MM = None  # probe again
    try:
        got = ce_triton._accumulate_mm(acc.clone(), a, bm)
        path = ce_triton._OUT_DTYPE_MM
    finally:
        ce_triton._OUT_DTYPE_MM = old if old is not None else ce_triton._OUT_DTYPE_MM
    assert got.dtype == torch.float32
    err = _max_err(got, want)
    if path is False:
        lowp = acc + (a @ bm).float()  # the fallback: the bf16 product added in fp32
        assert err <= 1.5 * _max_err(lowp, want) + 1e-3
        pytest.skip("torch.addmm(out_dtype=fp32) is unavailable here: the mm + add fallback was checked instead")
    assert err <= 1e-4 * want.abs().max().item(), f"addmm(out_dtype=fp32): max error {err:.3g}"


def test_masked_cross_entropy_multi_pass_softmax(device):
    """V = 65536 > 16384: the kernel walks each row in 4096-wide slices (two passes)."""
    from kernels.masked.reference import masked_cross_entropy_rows_reference

    M, D, V = sized((300, 256, 65536), (8, 16, 20000))
    g = torch.Generator(device="cpu").manual_seed(5)
    h = torch.randn(M, D, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (M,), generator=g).to(device)
    with use_backend("triton"):
        loss = kernels.masked_cross_entropy(h, w, None, t)
    r64_in = [_f64(h), _f64(w)]
    r64 = masked_cross_entropy_rows_reference(r64_in[0], r64_in[1], None, t)
    assert abs(loss.item() - r64.item()) <= 2e-2 * abs(r64.item())
    got = _grads(loss, [h, w], None)
    want = _grads(r64, r64_in, None)
    low = _grads(masked_cross_entropy_rows_reference(h, w, None, t), [h, w], None)
    for n, a, lo, e in zip(("grad_h", "grad_W"), got, low, want):
        assert_like_torch(f"CE V=65536 {n}", a, lo, e, EPS[torch.bfloat16])


# ------------------------------------------------------------------------------------------------------------
# SparK: sparse convolution at the ResNet-50 / ConvNeXt layer shapes, masked batch norm

CONV_BATCH, CONV_IMAGE = sized((4, 224), (1, 64))
# (layer, dtype, path): "units" builds the activity map on the device from the unit mask, as SparK does (the
# unit-tiled kernels run); "sites" uses a copy of the map, which carries no unit mark (the site-list fallback
# runs, as for any map that is not made of whole units)
CONV_CASES = [(n, torch.bfloat16, "units") for n in LAYERS] + [
    (n, dt, "units") for dt in (torch.float16, torch.float32) for n in ("rn50_l1_3x3", "rn50_l2_3x3s2", "cnxb_dw7_s1")
] + [(n, torch.bfloat16, "sites") for n in ("rn50_l1_3x3", "rn50_l2_3x3s2", "cnxb_dw7_s1")]
if DRY:
    CONV_CASES = [("rn50_l1_3x3", torch.bfloat16, "units"), ("rn50_l2_3x3s2", torch.float32, "units"),
                  ("cnxb_dw7_s1", torch.float16, "units"), ("rn50_l2_3x3s2", torch.bfloat16, "sites")]


def _conv_case(name, dtype, device, path="units"):
    from kernels.sparse_conv import downsample_active, upsample_active

    cin, cout, k, stride, depthwise, in_stride = LAYERS[name]
    if DRY:
        cin, cout = max(3, cin // 16), max(3, cout // 16)
        cin = cout if depthwise else cin
    units = CONV_IMAGE // 32
    keep = ~kernels.spark_masks(CONV_BATCH, units, units, 0.6, seed=0)
    res = CONV_IMAGE // in_stride if not DRY else min(CONV_IMAGE // in_stride, 8)
    if path == "units":
        active = upsample_active(keep.to(device), res // units)
    else:
        active = upsample_active(keep, res // units).to(device).clone()
    g = torch.Generator(device="cpu").manual_seed(6)
    x = torch.randn(CONV_BATCH, cin, res, res, generator=g).to(device, dtype)
    x = (x * active.unsqueeze(1)).contiguous(memory_format=torch.channels_last).requires_grad_()
    groups = cin if depthwise else 1
    w = (torch.randn(cout, cin // groups, k, k, generator=g) * (1.0 / (k * (cin // groups) ** 0.5)))
    w = w.to(device, dtype).requires_grad_()
    b = (torch.randn(cout, generator=g) * 0.1).to(device, dtype).requires_grad_()
    out_res = (res + 2 * (k // 2) - k) // stride + 1
    a_out = downsample_active(active, stride, (out_res, out_res))
    params = {"stride": stride, "padding": k // 2, "groups": groups}
    return x, active, a_out, w, b, params


@pytest.mark.parametrize("name,dtype,path", CONV_CASES, ids=[f"{n}-{str(d)[6:]}-{p}" for n, d, p in CONV_CASES])
def test_sparse_conv_real_layer_shapes(device, name, dtype, path):
    from kernels import sparse_conv2d
    from kernels.sparse_conv.reference import sparse_conv2d_reference
    from kernels.sparse_conv.sparse_conv2d import validate

    x, active, a_out, w, b, params = _conv_case(name, dtype, device, path)
    ran = validate(x, active, w, b, active_out=a_out, **params).triton_path
    assert ran.startswith(path + ":"), f"expected the {path} kernels, inputs say {ran!r}"
    with use_backend("triton", op="sparse_conv2d"):
        out, _ = sparse_conv2d(x, active, w, b, active_out=a_out, **params)
    g = torch.randn(out.shape, generator=torch.Generator(device="cpu").manual_seed(7)).to(device, dtype)
    g = g * a_out.unsqueeze(1)
    got = (out, *_grads(out, [x, w, b], g))
    s, p, gr = params["stride"], params["padding"], params["groups"]
    r64_in = [_f64(t) for t in (x, w, b)]
    r64 = sparse_conv2d_reference(r64_in[0], active, a_out, r64_in[1], r64_in[2], s, p, 1, gr)
    want = (r64, *_grads(r64, r64_in, g.double()))
    lowp = sparse_conv2d_reference(x, active, a_out, w, b, s, p, 1, gr)  # cuDNN (TF32 for fp32 by default)
    low = (lowp, *_grads(lowp, [x, w, b], g))
    eps = EPS[dtype] if dtype != torch.float32 else EPS["tf32"]
    for n, a, lo, e in zip(("out", "dx", "dweight", "dbias"), got, low, want):
        assert a.dtype == dtype, (n, a.dtype)
        assert_like_torch(f"{name} {n}", a, lo, e, eps)
    inactive = ~a_out.unsqueeze(1).expand_as(out)
    assert torch.all(out.detach()[inactive] == 0), "non-zero outputs at inactive sites"


BN = sized((32, 56, 256), (2, 8, 16))  # ResNet-50 stage 1: batch 32, 56 x 56, 256 channels


@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, "channels_last"), (torch.bfloat16, "nchw"),
                                          (torch.float32, "channels_last")], ids=["bf16-cl", "bf16-nchw", "fp32-cl"])
def test_masked_batch_norm_real_shape(device, dtype, layout):
    from kernels import masked_batch_norm
    from kernels.sparse_conv import upsample_active
    from kernels.sparse_conv.reference import masked_batch_norm_reference

    B, R, C = BN
    keep = ~kernels.spark_masks(B, 7 if not DRY else 2, 7 if not DRY else 2, 0.6, seed=0)
    active = upsample_active(keep, R // keep.shape[-1]).to(device)
    g = torch.Generator(device="cpu").manual_seed(8)
    x = (torch.randn(B, C, R, R, generator=g) * 2 + 0.5).to(device, dtype) * active.unsqueeze(1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_()
    w = (torch.rand(C, generator=g) + 0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(C, generator=g) * 0.1).to(device, dtype).requires_grad_()
    with use_backend("triton", op="masked_batch_norm"):
        y, mean, var, n = masked_batch_norm(x, active, w, b)
    gy = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(9)).to(device, dtype)
    got = (y, mean, var, *_grads(y, [x, w, b], gy))
    r64_in = [_f64(t) for t in (x, w, b)]
    ry, rmean, rvar, rn = masked_batch_norm_reference(r64_in[0], active, r64_in[1], r64_in[2])
    want = (ry, rmean, rvar, *_grads(ry, r64_in, gy.double()))
    ly, lmean, lvar, _ = masked_batch_norm_reference(x, active, w, b)
    low = (ly, lmean, lvar, *_grads(ly, [x, w, b], gy))
    assert int(n) == int(rn)
    for nm, a, lo, e in zip(("y", "mean", "var", "dx", "dweight", "dbias"), got, low, want):
        assert_like_torch(f"masked BN {nm}", a, lo, e, EPS[dtype])
