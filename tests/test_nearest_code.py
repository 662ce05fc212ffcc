"""nearest_code: the fused nearest-code lookup (Triton under the interpreter vs the reference), ties, mixed
dtypes, straight-through gradients, input checks, the sm_90 AOT compile of the codebook kernels."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close, poison

from kernels import nearest_code, use_backend
from kernels._checks import acc_dtype
from kernels.codebook import reference as ref

BACKENDS = ["triton", "reference"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# unit roundoff of the score-GEMM operands (the Triton interpreter truncates fp32 -> bf16: one full ulp)
OPERAND_ROUNDOFF = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}


# fp32 GEMM operand precisions: one TF32 pass truncates both operands to 10-bit mantissas; tf32x3 splits them
# into hi + lo TF32 parts (representation error ~2^-21) and drops lo*lo (~2^-22)
PRECISION_ROUNDOFF = {"ieee": 1e-6, "tf32x3": 2.0**-19, "tf32": 2.0**-10}


def _lookup_tolerance(x, cb_used, dtype, normalize, precision="auto"):
    """Per-row bound on the score error from rounding both GEMM operands: 2u ||x|| max||c||.

    Doubled for the L2 score (2 <x, c> - ||c||^2)."""
    u = PRECISION_ROUNDOFF[precision] if dtype == torch.float32 and precision != "auto" else OPERAND_ROUNDOFF[dtype]
    bound = 2 * u * x.norm(dim=-1) * cb_used.norm(dim=-1).max()
    return (bound * (1 if normalize else 2) + TOLERANCES[dtype][0]).to(torch.float64)


def _exact_scores(z, codebook, normalize, eps=1e-12):
    x = z.detach().reshape(-1, z.shape[-1]).to(torch.float64)
    cb = ref.prepare_codebook(codebook, normalize, eps, torch.float64)
    if normalize:
        x = ref.l2n(x, eps)
        return x, cb, x @ cb.t()
    return x, cb, 2 * x @ cb.t() - (cb * cb).sum(-1)


def _check_lookup(z, codebook, normalize, indices, z_q, sim, dtype, precision="auto"):
    x, cb64, scores = _exact_scores(z, codebook, normalize)
    flat_idx = indices.reshape(-1)
    assert flat_idx.dtype == torch.int64 and (flat_idx >= 0).all() and (flat_idx < codebook.shape[0]).all()
    top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
    tol = _lookup_tolerance(x, cb64, dtype, normalize, precision)
    chosen = scores.gather(1, flat_idx[:, None]).squeeze(1)
    # the chosen code is never worse than the best by more than the rounding bound ...
    assert (chosen >= top2[:, 0] - tol).all(), (
        f"chosen similarity below best by {(top2[:, 0] - chosen).max():.3g}"
    )
    # ... and where the best is separated from the runner-up by more than that bound, it is the argmax
    if scores.shape[1] > 1:
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        assert clear.float().mean() > 0.5, "test data has too many near-ties to be meaningful"
        assert torch.equal(flat_idx[clear], scores.argmax(1)[clear])
    # z_q is exactly the (normalised) codebook row as used by the op, in the promoted dtype
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    cdt = acc_dtype(out_dtype)
    cb_used = ref.prepare_codebook(codebook, normalize, 1e-12, cdt)
    assert z_q.dtype == out_dtype
    assert torch.equal(z_q.detach().reshape(-1, z.shape[-1]), cb_used[flat_idx].to(out_dtype))
    # the reported similarity is the exact score of the chosen code (fp32/fp64 accumulation)
    assert sim.dtype == cdt
    assert_close(
        sim.reshape(-1),
        chosen,
        dtype=cdt,
        atol=1e-5 if cdt == torch.float32 else 1e-10,
        rtol=1e-5 if cdt == torch.float32 else 1e-10,
        name="similarity",
    )


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts NaN (or a sentinel), so unwritten elements fail."""

    def alloc(shape, dtype, device):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr("kernels._buffers.empty", alloc)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
@pytest.mark.parametrize("d", [32, 13])
def test_lookup_forward_backward_vs_reference(backend, dtype, normalize, d, device):
    M, K = 777, 1000
    codebook = torch.randn(K, d, dtype=torch.float64)
    if normalize:
        codebook = F.normalize(codebook, dim=-1)
    codebook = codebook.to(dtype)
    # 2/3 of the rows near a code (clear winners even in bf16), 1/3 random (many near-ties)
    base = torch.randn(M, 2 * d, dtype=torch.float64)
    near = torch.randint(0, K, (2 * M // 3,))
    base[: near.numel(), ::2] = 2.0 * codebook[near].to(torch.float64) + 0.3 * base[: near.numel(), ::2]
    codebook = codebook.to(device)
    z = base.to(device, dtype)[:, ::2]  # non-contiguous rows and columns
    assert not z.is_contiguous()
    z = z.detach().requires_grad_(True)
    zr = z.detach().clone().requires_grad_(True)
    with use_backend(backend, op="nearest_code"):
        idx, z_q, sim = nearest_code(z, codebook, normalize)
    _check_lookup(z, codebook, normalize, idx, z_q, sim, dtype)

    # straight-through gradient: identical to autograd of F.normalize on the reference path
    g = torch.randn(M, d, dtype=torch.float64).to(device, z_q.dtype)
    (z_q * g).sum().backward()
    _, zq_ref, _ = ref.nearest_code_reference(zr, codebook, normalize)
    (zq_ref * g).sum().backward()
    assert z.grad.dtype == dtype
    assert_close(z.grad, zr.grad, dtype=dtype, name="dz")
    if dtype == torch.float64 and normalize:
        # and equal to the analytic projection (g - x <x, g>) / ||z|| in float64
        zz = z.detach()
        n = zz.norm(dim=-1, keepdim=True)
        x = zz / n
        expected = (g - x * (x * g).sum(-1, keepdim=True)) / n
        assert_close(z.grad, expected, dtype=torch.float64, name="dz analytic")


@pytest.mark.interpreter
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
def test_triton_launcher_writes_every_output(normalize, device):
    """Call the launchers directly on NaN/sentinel-poisoned buffers (the autouse fixture): every element must be
    written."""
    from kernels.codebook import nearest_code_triton as tk

    M, K, d = 301, 333, 13
    z = torch.randn(M, d, device=device)
    prep = tk.prepare_codebook(torch.randn(K, d, device=device), normalize, 1e-12, torch.float32, torch.float32)
    cb = prep.cb
    idx, zq, sim = tk.nearest_code_forward(z, prep, normalize, 1e-12, "ieee", torch.float32)
    ridx, _, rsim = ref.nearest_code_scores_reference(z, cb, normalize)
    assert torch.equal(idx, ridx)
    assert torch.equal(zq, cb[idx])
    assert_close(sim, rsim, dtype=torch.float32, name="similarity")
    g = torch.randn(M, d, device=device)
    gz = tk.nearest_code_backward(z, g, 1e-12)
    zr = z.clone().requires_grad_(True)
    F.normalize(zr, dim=-1, eps=1e-12).backward(g)
    assert_close(gz, zr.grad, dtype=torch.float32, name="dz")


@pytest.mark.interpreter
@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
def test_fp32_precisions_judged_by_similarity(precision, normalize, device):
    """fp32 inputs on each GEMM precision (the interpreter emulates TF32 rounding and the tf32x3 split): the pick
    is within that precision's rounding bound of the best score, is the argmax where the best is clear, and
    its reported similarity is exact. Odd shapes: M 333 (ragged row tile), K 301 (ragged code tile), d 19."""
    M, K, d = 333, 301, 19
    codebook = F.normalize(torch.randn(K, d, dtype=torch.float64), dim=-1).to(torch.float32)
    z = torch.randn(M, d)
    z[: 2 * M // 3] = 2 * codebook[torch.randint(0, K, (2 * M // 3,))] + 0.3 * z[: 2 * M // 3]
    z, codebook = z.to(device), codebook.to(device)
    with use_backend("triton", op="nearest_code"):
        idx, z_q, sim = nearest_code(z, codebook, normalize, precision=precision)
    _check_lookup(z, codebook, normalize, idx, z_q, sim, torch.float32, precision)


@pytest.mark.interpreter
def test_tf32_rounding_is_emulated_and_tf32x3_recovers_it(device):
    """A two-code race decided below TF32's 10-bit mantissa (so the precision test above can fail): code 1 beats
    code 0 by 2^-11 in exact and fp32 arithmetic; one TF32 pass truncates 1 - 2^-12 to 1 - 2^-11 and so prefers
    code 0; the tf32x3 split recovers the low bits and picks code 1 again."""
    from kernels.codebook import nearest_code_triton as tk

    d = 16
    cb = torch.ones(2, d, device=device)
    cb[1, 0], cb[1, 1] = 1.0 + 2.0**-12, 1.0 - 2.0**-12  # ||c_1||^2 rounds to 16 = ||c_0||^2 in fp32
    z = torch.ones(3, d, device=device)
    z[:, 0] = 2.0  # <z, c_1> - <z, c_0> = 2^-12 exactly; TF32 makes it -2^-11
    prep = tk.prepare_codebook(cb, False, 1e-12, torch.float32, torch.float32)
    picks = {p: tk.nearest_code_forward(z, prep, False, 1e-12, p, torch.float32)[0].tolist()
             for p in ("ieee", "tf32", "tf32x3")}
    assert picks == {"ieee": [1, 1, 1], "tf32": [0, 0, 0], "tf32x3": [1, 1, 1]}, picks


@pytest.mark.interpreter
def test_prepared_codebook_cache_is_never_stale(device):
    """cache_codebook=True reuses the prepared codebook only while the codebook is unchanged: the EMA update
    (raw-pointer kernels), an in-place op, a dead-code restart, a new tensor and a different precision or
    dtype all rebuild it; every lookup equals an uncached one."""
    from kernels import ema_codebook_update
    from kernels.codebook.nearest_code import PREPARED

    K, d, M = 150, 13, 97
    codebook = F.normalize(torch.randn(K, d), dim=-1).to(device)
    cluster, embed_sum = torch.zeros(K, device=device), torch.zeros(K, d, device=device)
    steps = torch.zeros(K, dtype=torch.int64, device=device)
    PREPARED.clear()

    def lookup(z, cb, **kw):
        with use_backend("triton"):
            cached = nearest_code(z, cb, cache_codebook=True, **kw)
            fresh = nearest_code(z, cb, **kw)
        assert torch.equal(cached.indices, fresh.indices) and torch.equal(cached.z_q, fresh.z_q)
        assert torch.equal(cached.similarity, fresh.similarity)
        return cached

    z = torch.randn(M, d, device=device)
    b0 = PREPARED.builds
    first = lookup(z, codebook)
    lookup(torch.randn(M, d, device=device), codebook)
    assert PREPARED.builds == b0 + 1  # second call: a hit
    with use_backend("triton"):  # EMA step: the Triton kernels write the codebook through raw pointers
        ema_codebook_update(codebook, cluster, embed_sum, z, first.indices, decay=0.5, steps_since_used=steps)
    after = lookup(z, codebook)
    assert PREPARED.builds == b0 + 2
    _check_lookup(z, codebook, True, after.indices, after.z_q, after.similarity, torch.float32)
    with torch.no_grad():
        codebook.mul_(-1.0)  # an in-place op (version bump): every pick changes
    flipped = lookup(z, codebook)
    assert PREPARED.builds == b0 + 3 and not torch.equal(flipped.indices, after.indices)
    with use_backend("reference"):  # the reference EMA writes through .data (no bump of its own)
        ema_codebook_update(codebook, cluster, embed_sum, z, flipped.indices, decay=0.5)
    lookup(z, codebook)
    assert PREPARED.builds == b0 + 4
    steps.fill_(10)  # every code dead: the restart writes codebook.data[dead]
    with use_backend("triton"):
        ema_codebook_update(codebook, cluster, embed_sum, z, flipped.indices, dead_code_threshold=5,
                            steps_since_used=steps, generator=torch.Generator(device).manual_seed(0))
    restarted = lookup(z, codebook)
    assert PREPARED.builds == b0 + 5
    _check_lookup(z, codebook, True, restarted.indices, restarted.z_q, restarted.similarity, torch.float32)
    lookup(z, codebook, precision="ieee")  # the same fp32 operands as tf32x3: the same prepared codebook
    assert PREPARED.builds == b0 + 5
    lookup(z.to(torch.bfloat16), codebook)  # bf16 operands: rebuilt
    assert PREPARED.builds == b0 + 6
    other = codebook.clone()  # same values, another tensor: its own entry, never the first one's
    lookup(z, other)
    assert PREPARED.builds == b0 + 7
    PREPARED.clear()


def test_vector_quantizer_turns_the_cache_on(monkeypatch):
    from kernels.codebook import modules

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    real = modules.nearest_code
    monkeypatch.setattr(modules, "nearest_code", spy)
    vq = modules.VectorQuantizer(num_codes=16, dim=8, kmeans_init=False)
    vq(torch.randn(5, 8))
    assert seen.get("cache_codebook") is True


def test_lookup_candidates_drop_the_configs_that_spill():
    """The autotuner the CUDA launcher uses for each dot and architecture: a tf32x3 dot on sm_8x (mma.sync)
    never gets the 32-rows-per-warp tiles (M128 w4, M256 w8: 16-852 B of ptxas spills at the BEiT v2 shape,
    ``python -m bench.static_gpu_check --ops codebook``); sm_90 and the other precisions keep every tile, and
    tensor-core tiles of 64 and 128 rows stay for the pruned case."""
    from kernels.codebook import nearest_code_triton as tk

    def tiles(tensor_cores, precision, capability):
        tuner = tk.lookup_autotuner(tensor_cores, precision, capability)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in tuner.configs]

    spilling = {(128, 64, 4, 3), (256, 64, 8, 3), (256, 128, 8, 3)}
    assert spilling <= set(tk.TC_CONFIGS)
    for cap in ((8, 0), (8, 6), (8, 9)):
        kept = tiles(True, "tf32x3", cap)
        assert kept == [c for c in tk.TC_CONFIGS if c not in spilling]
        assert {bm for bm, _, _, _ in kept} == {64, 128}
    assert tiles(True, "tf32x3", (9, 0)) == tk.TC_CONFIGS
    for precision in ("tf32", "ieee"):  # bf16 / fp16 operands pass "ieee" (ignored by their dots)
        assert tiles(True, precision, (8, 0)) == tk.TC_CONFIGS
    assert tiles(False, "ieee", (8, 0)) == tiles(False, "ieee", (9, 0)) == tk.FMA_CONFIGS
    # one autotuner per candidate list: its timings are never shared with another list's
    assert tk.lookup_autotuner(True, "tf32x3", (8, 0)) is tk.lookup_autotuner(True, "tf32x3", (8, 6))
    assert tk.lookup_autotuner(True, "tf32x3", (8, 0)) is not tk.lookup_autotuner(True, "tf32x3", (9, 0))


def _dyadic_units(n, d):
    """Rows with four entries of +-1/2 at random places (the rest 0): unit norm exactly, and every dot product
    with such a row is a sum of multiples of 1/4 (or of their multiples by a power of two) -- exact in any
    summation order. Exact duplicates then score exactly alike everywhere: the interpreter's tl.dot
    (``np.matmul``, OpenBLAS) is not column-position invariant, so duplicated columns of arbitrary values can
    differ by an ulp there, which is not a tie."""
    rows = torch.zeros(n, d)
    for i in range(n):
        rows[i, torch.randperm(d)[:4]] = 0.5 * (2 * torch.randint(0, 2, (4,)) - 1).float()
    return rows


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
@pytest.mark.parametrize("K", [300, 256], ids=["ragged_K", "even_K"])
def test_ties_resolve_to_lowest_index(backend, normalize, K, device):
    d = 13
    codebook = F.normalize(torch.randn(K, d), dim=-1)
    codebook[7] = _dyadic_units(1, d)[0]
    # duplicates of code 7 inside the same 128-wide tile (60) and in later tiles (135 at the same tile
    # position as 7, 150, K-1)
    for j in (60, 135, 150, K - 1):
        codebook[j] = codebook[7]
    # z along code 7 at exact scales (x = code 7 exactly after the normalisation): codes 7, 60, 135, 150 and
    # K-1 tie exactly for the best score, every other code scores below it
    scales = torch.tensor([0.25, 1.0, 3.0, 64.0]).repeat_interleave(10)
    z = (scales[:, None] * codebook[7]).to(device)
    codebook = codebook.to(device)
    with use_backend(backend, op="nearest_code"):
        idx = nearest_code(z, codebook, normalize).indices
    assert (idx == 7).all(), idx
    # an all-identical codebook: every row must pick code 0
    same = _dyadic_units(1, d).expand(K, d).contiguous().to(device)
    with use_backend(backend, op="nearest_code"):
        idx = nearest_code(_dyadic_units(40, d).to(device), same, normalize).indices
    assert (idx == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_mixed_dtypes_and_empty(backend, device):
    codebook = F.normalize(torch.randn(257, 32), dim=-1)  # fp32 codebook, bf16 activations (autocast case)
    near = codebook[torch.randint(0, 257, (3, 67))]
    z = (2 * near + 0.3 * torch.randn(3, 67, 32)).to(device, torch.bfloat16).requires_grad_(True)
    codebook = codebook.to(device)
    with use_backend(backend, op="nearest_code"):
        idx, z_q, sim = nearest_code(z, codebook)
    assert idx.shape == (3, 67) and z_q.shape == (3, 67, 32) and sim.shape == (3, 67)
    assert z_q.dtype == torch.float32
    _check_lookup(z, codebook, True, idx, z_q, sim, torch.bfloat16)
    z_q.sum().backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    with use_backend(backend, op="nearest_code"):
        e_idx, e_zq, e_sim = nearest_code(torch.randn(0, 5, 32, device=device), codebook)
    assert e_idx.shape == (0, 5) and e_zq.shape == (0, 5, 32) and e_sim.shape == (0, 5)


def test_cpu_default_is_reference_and_zero_norm_rows():
    from kernels.codebook.nearest_code import OP, validate

    z = torch.randn(9, 13)
    z[2] = 0.0  # zero row: F.normalize semantics (x / eps) -> all scores 0 -> lowest index
    codebook = torch.randn(21, 13)
    assert OP.select(validate(z, codebook)).backend == "reference"
    idx, _, sim = nearest_code(z, codebook)
    assert idx[2] == 0 and sim[2] == 0


def test_bad_inputs_raise_clear_errors():
    cb = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., d\] with d = codebook.shape\[1\] = 8"):
        nearest_code(torch.randn(4, 7), cb)
    with pytest.raises(ValueError, match="codebook is empty"):
        nearest_code(torch.randn(4, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="codebook: expected 2-D tensor"):
        nearest_code(torch.randn(4, 8), torch.randn(8))
    with pytest.raises(TypeError, match=r"z: expected dtype in \(float32, bfloat16, float16, float64\), got int64"):
        nearest_code(torch.ones(4, 8, dtype=torch.int64), cb)
    with pytest.raises(TypeError, match="codebook: expected a torch.Tensor"):
        nearest_code(torch.randn(4, 8), [[1.0] * 8])
    z = torch.randn(4, 8)
    z[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"z contains 1 non-finite value\(s\)"):
        nearest_code(z, cb)
    bad_cb = cb.clone()
    bad_cb[0, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook contains 1 non-finite"):
        nearest_code(torch.randn(4, 8), bad_cb)
    with pytest.raises(ValueError, match="precision must be one of"):
        nearest_code(torch.randn(4, 8), cb, precision="int8")


def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile for an H100 target with the JIT's real specialisation, at the BEiT v2 tokenizer
    shape (M 50176, K 8192, d 32): three of the lookup's autotune configs (bf16, tf32x3, IEEE fp32), its
    backward and the EMA kernels. Catches typing and lowering errors the interpreter cannot see;
    every autotune config for every precision: ``python -m bench.static_gpu_check --ops codebook``."""
    from _aot import run_static

    results = run_static("codebook")
    assert len(results) == 6
    lookups = {r["case"].split(" config")[0]: r for r in results if r["kernel"] == "_nearest_code_fwd_kernel"}
    assert lookups["z=bfloat16 dot=bfloat16/ieee cosine"]["found"] == "wgmma"
    assert lookups["z=float32 dot=float32/tf32x3 cosine"]["found"] == "wgmma"  # the fp32 default
    ieee = lookups["z=float32 dot=float32/ieee cosine"]
    assert ieee["found"] == "none" and ieee["spill_stores"] == 0  # FMA dots, the tile that does not spill
