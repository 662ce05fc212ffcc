"""Hostile inputs (issue 16): sizes, values and argument mixes that used to abort the process, return a
silently wrong answer or fail with a raw traceback from deep inside an op. Each must now give the right
answer or a clear error naming the argument and what was expected."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import use_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_isolated(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, so an abort (SIGABRT) fails the test instead of killing pytest."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


# ----------------------------------------------------------------------------------------------------------
# 5. mask generators: huge sizes abort the process from inside the C++ OpenMP region


HUGE_MASK_CALLS = [
    ("kernels.spark_masks(1, 2**16, 2**16, seed=0)", "grid_h \\* grid_w"),
    ("kernels.blockwise_masks(1, 2**31, 2, 1, seed=0)", "grid_h \\* grid_w"),
    ("kernels.blockwise_masks(2**20, 64, 64, 1, seed=0)", "batch_size"),
    ("kernels.simmim_masks(1, 2**20, 2**16, 1, seed=0)", "image_size"),
    ("kernels.simmim_masks(2**16, 2**14, 2**14, 2**4, seed=0)", "batch_size"),
    ("kernels.random_masks(1, 2**33, seed=0)", "num_tokens"),
    ("kernels.random_masks(2**20, 2**11, seed=0)", "batch_size"),
]


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_huge_masks_raise_a_clear_error_not_abort(backend):
    """One fresh interpreter per backend runs every case (an abort there fails this test, not pytest)."""
    proc = _run_isolated(f"""
        import re, kernels
        cases = {HUGE_MASK_CALLS!r}
        with kernels.use_backend({backend!r}):
            for call, arg in cases:
                try:
                    eval(call)
                except ValueError as exc:
                    msg = str(exc)
                    assert re.search(arg, msg) and "at most" in msg, (call, msg)
                    print("OK", call, "->", msg)
                else:
                    raise SystemExit("no error from " + call)
        """)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr[-2000:]}"
    assert proc.stdout.count("OK") == len(HUGE_MASK_CALLS), proc.stdout


def test_native_mask_entry_points_raise_python_errors():
    """The raw C++ entry points (bypassing the Python checks) raise Python errors, never abort: allocation
    failures happen before the OpenMP region (MemoryError) and bad arguments are ValueErrors."""
    proc = _run_isolated("""
        from kernels import _backend
        C = _backend.native()
        calls = {
            "choose_k_huge": lambda: C.choose_k_masks(0, 1, 2**40, 0, 0, 2),
            "blockwise_huge": lambda: C.blockwise_masks(0, 1, 2**31, 2, 1, 1, 1, 0.3, 0, 2),
            "shuffle_huge": lambda: C.shuffle_masks(0, 0, 0, 1, 2**40, 1, 0, 2),
            "choose_k_bad_k": lambda: C.choose_k_masks(0, 1, 4, 5, 0, 1),
            "blockwise_overflow": lambda: C.blockwise_masks(0, 1, 2**40, 2**40, 1, 1, 1, 0.3, 0, 1),
            "shuffle_negative_batch": lambda: C.shuffle_masks(0, 0, 0, -1, 4, 1, 0, 1),
        }
        for name, call in calls.items():
            try:
                call()
            except (MemoryError, ValueError) as exc:
                print(name, type(exc).__name__)
            else:
                raise SystemExit(name + ": no error")
        print("OK")
        """)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr[-2000:]}"
    assert proc.stdout.strip().endswith("OK")


@pytest.mark.parametrize("call,arg", [
    (lambda: kernels.blockwise_masks(2, 14, 14, 75, min_aspect="0.3"), "min_aspect"),
    (lambda: kernels.spark_masks(2, 7, 7, True), "ratio"),
    (lambda: kernels.random_masks(2, 10, float("nan")), "ratio"),
    (lambda: kernels.blockwise_masks(2, 14, 14, 75, min_aspect=float("nan")), "min_aspect"),
])
def test_mask_bad_argument_types(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


# ----------------------------------------------------------------------------------------------------------
# 6a. nearest_code on huge values: ||z||^2 overflowed float32 (cosine: index 0 everywhere; L2: -inf / NaN)


def _nearest_code_float64(z, codebook, normalize):
    """Exact-range oracle: scale z and the codebook by 2**-70 in float64 (never overflows, same argmax)."""
    zd, cd = z.double() * 2.0**-70, codebook.double() * 2.0**-70
    if normalize:
        zn, cn = zd / zd.norm(dim=-1, keepdim=True), cd / cd.norm(dim=-1, keepdim=True)
        scores = zn @ cn.t()
        return scores.argmax(1), scores.max(1).values
    scores = 2 * zd @ cd.t() - (cd * cd).sum(-1)
    return scores.argmax(1), scores.max(1).values * 2.0**140


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
@pytest.mark.parametrize("scale", [(1e20, 1.0), (1e20, 1e20), (1e30, 1e-3), (1.0, 1e25)], ids=str)
def test_nearest_code_huge_values(backend, normalize, scale):
    torch.manual_seed(0)
    zs, cs = scale
    z = torch.randn(37, 8) * zs
    codebook = torch.randn(40, 8) * cs
    expected_idx, expected_sim = _nearest_code_float64(z, codebook, normalize)
    zr = z.clone().requires_grad_(True)
    with use_backend(backend, op="nearest_code"):
        idx, z_q, sim = kernels.nearest_code(zr, codebook, normalize=normalize)
        (z_q * torch.arange(8.0)).sum().backward()
    # near-ties in fp32 may legitimately differ; the chosen code must be as good as the best within rounding
    agree = (idx == expected_idx).float().mean().item()
    assert agree > 0.9, (agree, idx.tolist(), expected_idx.tolist())
    if normalize:
        assert torch.isfinite(sim).all()
        torch.testing.assert_close(sim.double(), expected_sim, atol=1e-5, rtol=1e-4)
        assert torch.equal(z_q.detach(), kernels.codebook.reference.l2n(codebook, 1e-12)[idx])
        # gradient of l2n(z) at z = a * z0 is that at z0 divided by a: finite, tiny, never NaN
        z0 = (z.double() * 2.0**-70).requires_grad_(True)
        (z0 / z0.norm(dim=-1, keepdim=True) * torch.arange(8.0, dtype=torch.float64)).sum().backward()
        expected_grad = z0.grad * 2.0**-70
        assert torch.isfinite(zr.grad).all()
        torch.testing.assert_close(zr.grad.double(), expected_grad, atol=0.0, rtol=1e-3)
    else:
        assert not torch.isnan(sim).any()
        fits = expected_sim.abs() < torch.finfo(torch.float32).max
        torch.testing.assert_close(sim.double()[fits], expected_sim[fits], atol=0.0, rtol=1e-4)
        assert torch.equal(sim[~fits], torch.sign(expected_sim[~fits]).float() * float("inf"))
        assert torch.equal(z_q.detach(), codebook[idx])
        assert torch.equal(zr.grad, torch.arange(8.0).expand(37, 8))


# ----------------------------------------------------------------------------------------------------------
# 6c. a NaN batch must not poison the VQ codebook (EMA sums) forever


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm_ema", "mean_ema"])
def test_ema_update_skips_non_finite_rows(backend, normalize):
    from kernels.codebook import reference as ref

    torch.manual_seed(0)
    K, d, M = 16, 8, 64
    codebook = F.normalize(torch.randn(K, d), dim=-1)
    z = torch.randn(M, d)
    indices = torch.randint(0, K, (M,))
    bad = torch.zeros(M, dtype=torch.bool)
    bad[[0, 5, 6, 40]] = True
    z_bad = z.clone()
    z_bad[0, 3] = float("nan")
    z_bad[5] = float("nan")
    z_bad[6, 0] = float("inf")
    z_bad[40, 7] = -float("inf")
    expected_cb, expected_cluster = ref.ema_update_onehot_reference(
        codebook, torch.zeros(K), z[~bad], indices[~bad], 0.9, 1e-5, normalize
    )
    cb, cl, es = codebook.clone(), torch.zeros(K), torch.zeros(K, d)
    with use_backend(backend):
        counts = kernels.ema_codebook_update(cb, cl, es, z_bad, indices, decay=0.9, normalize=normalize,
                                             check_inputs=False)
    assert torch.isfinite(cb).all() and torch.isfinite(cl).all() and torch.isfinite(es).all()
    assert torch.equal(counts, torch.bincount(indices[~bad], minlength=K).float())
    torch.testing.assert_close(cb.double(), expected_cb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cl.double(), expected_cluster, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="z contains 11 non-finite"):
        kernels.ema_codebook_update(cb, cl, es, z_bad, indices, check_inputs=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_vector_quantizer_survives_a_nan_batch(backend):
    torch.manual_seed(0)
    with use_backend(backend):
        vq = kernels.VectorQuantizer(num_codes=16, dim=8, dead_code_threshold=1).train()
        first = torch.randn(2, 16, 8)
        first[0, :5] = float("nan")  # k-means init on the finite rows only
        vq(first)
        assert bool(vq.initialized) and torch.isfinite(vq.codebook).all()
        bad = torch.randn(2, 16, 8)
        bad[0, 3] = float("nan")
        bad[1] = float("inf")
        _, _, loss = vq(bad)
        assert torch.isfinite(vq.codebook).all() and torch.isfinite(vq.cluster_size).all()
        assert torch.isfinite(vq.embed_sum).all()
        vq(torch.full((1, 4, 8), float("nan")))  # nothing finite: dead codes keep their rows
        assert torch.isfinite(vq.codebook).all()
        good = torch.randn(2, 16, 8)
        _, ids, loss = vq(good)
        assert torch.isfinite(loss) and torch.isfinite(vq.codebook).all()
        assert (vq.codebook.norm(dim=-1) - 1).abs().max() < 1e-5


def test_vector_quantizer_waits_for_a_finite_batch_to_initialise():
    vq = kernels.VectorQuantizer(num_codes=8, dim=4).train()
    vq(torch.full((3, 4), float("nan")))
    assert not bool(vq.initialized) and torch.isfinite(vq.codebook).all()
    vq(torch.randn(32, 4))
    assert bool(vq.initialized) and torch.isfinite(vq.codebook).all()


def test_vector_quantizer_huge_inputs():
    torch.manual_seed(0)
    vq = kernels.VectorQuantizer(num_codes=8, dim=4).train()
    x = torch.randn(32, 4)
    vq(x)
    vq.eval()
    _, ids_small, loss_small = vq(x)
    _, ids_huge, loss_huge = vq(x * 1e25)  # cosine: the scale does not matter
    assert torch.equal(ids_small, ids_huge)
    torch.testing.assert_close(loss_huge, loss_small, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 6b. attention on huge inputs: q k^T * scale overflowed (inf - inf, or inf + -inf inside the dot) -> NaN


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "dtype,sq,sv,bias_scale",
    [(torch.float32, 1e30, 1.0, 0.0), (torch.float32, 1e30, 1e30, 1.0), (torch.float32, 1e19, 1.0, 0.0),
     (torch.bfloat16, 1e20, 1.0, 0.0), (torch.float16, 120.0, 1.0, 0.0)],
    ids=["fp32_1e30", "fp32_1e30_v_bias", "fp32_1e19", "bf16_1e20", "fp16_120"],
)
def test_attention_huge_inputs_match_float64(backend, dtype, sq, sv, bias_scale):
    torch.manual_seed(0)
    B, H, N, d = 2, 2, 11, 64
    q, k = ((torch.randn(B, H, N, d) * sq).to(dtype) for _ in range(2))
    v = (torch.randn(B, H, N, d) * sv).to(dtype)
    bias = torch.randn(H, N, N) * bias_scale if bias_scale else None
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) * d**-0.5 + (0 if bias is None else bias.double())
    expected = torch.softmax(s, -1) @ v64
    grad = torch.randn(B, H, N, d, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    with use_backend(backend, op="attention"):
        out = kernels.attention(qr, kr, vr, bias=bias)
        out.backward(grad.to(dtype))
    assert out.dtype == dtype and not torch.isnan(out).any()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol * max(sv, 1.0), rtol=tol)
    for name, g, e in zip("qkv", (qr.grad, kr.grad, vr.grad), expected_grads):
        assert torch.isfinite(g).all(), name
        if dtype == torch.float16 and backend == "triton":
            continue  # no overflow there (fp32 scores); near-one-hot P makes fp16 dq/dk rounding-bound (delta)
        torch.testing.assert_close(g.double(), e.to(dtype).double(), atol=tol * max(1.0, e.abs().max().item()),
                                   rtol=tol, msg=f"d{name}")


def test_attention_float64_overflow_raises_a_clear_error():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64) * 1e160
    with pytest.raises(ValueError, match="overflows float64"):
        kernels.attention(q, q, q)


def test_attention_keeps_nan_inputs_and_masked_rows_as_they_were():
    q = torch.randn(1, 1, 4, 8)
    q[0, 0, 1, 2] = float("nan")
    out = kernels.attention(q, q, q)
    assert torch.isnan(out).any()  # NaN in, NaN out (no float64 detour)
    bias = torch.zeros(1, 4, 4)
    bias[0, 2] = float("-inf")  # a fully masked row: unchanged behaviour of the math path
    q = torch.randn(1, 1, 4, 8)
    out = kernels.attention(q, q, q, bias=bias)
    expected = torch.softmax(q @ q.transpose(-1, -2) * 8**-0.5 + bias, -1) @ q
    assert torch.equal(torch.isnan(out), torch.isnan(expected))


# ----------------------------------------------------------------------------------------------------------
# 6d. 16-bit PNGs in the torch fallback loader: PIL's convert("RGB") clipped I;16 at 255 (99.6% white)


def _write_png16(path, arr):
    """A 16-bit PNG from uint16 ``[H, W]`` (gray), ``[H, W, 2]`` (gray+alpha), ``[H, W, 3]`` or ``[H, W, 4]``
    (PIL cannot write the colour ones itself)."""
    import struct
    import zlib

    arr = np.asarray(arr, dtype=">u2")
    colour = 0 if arr.ndim == 2 else {2: 4, 3: 2, 4: 6}[arr.shape[2]]
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].tobytes() for i in range(h))

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [0, 2, 3, 4], ids=["gray", "gray_alpha", "rgb", "rgba"])
def test_16bit_png_decodes_by_its_high_byte(tmp_path, channels):
    from engine.data.torch_transforms import decode

    rng = np.random.default_rng(0)
    shape = (20, 30) if channels == 0 else (20, 30, channels)
    wide = rng.integers(0, 65536, shape).astype(np.uint16)
    path = tmp_path / "wide.png"
    _write_png16(path, wide)
    img = decode(str(path))
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 30)
    high = wide >> 8
    expected = np.repeat(high[..., None], 3, 2) if channels == 0 else (
        np.repeat(high[..., :1], 3, 2) if channels == 2 else high[..., :3])
    assert torch.equal(img, torch.from_numpy(expected.astype(np.uint8)).permute(2, 0, 1))
    assert (img == 255).float().mean() < 0.05  # was 99.6% for grayscale
    assert torch.equal(decode(np.fromfile(path, dtype=np.uint8)), img)  # encoded bytes, as the loader passes


def test_16bit_grayscale_png_through_the_fallback_eval_loader(tmp_path):
    from PIL import Image

    from engine import data

    root = tmp_path / "wide" / "val" / "0"
    root.mkdir(parents=True)
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    for i in range(2):
        Image.fromarray(ramp).save(root / f"{i}.png")  # PIL writes I;16 arrays as 16-bit grayscale PNGs
        Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGB").save(root / f"{i}_8bit.png")
    batch = next(iter(data.build_eval_loader(tmp_path / "wide", "val", backend="torch", batch_size=4,
                                             image_size=32, num_threads=1)))
    images = batch["images"]
    assert images.shape[0] == 4
    # every file holds the same ramp: the 16-bit ones must give the pixels of their 8-bit (high byte) twins
    for img in images[1:]:
        torch.testing.assert_close(img, images[0], atol=1e-6, rtol=0)
    assert images[0].std() > 0.5  # a ramp, not a saturated white square


# ----------------------------------------------------------------------------------------------------------
# 7. raw RuntimeErrors from deep inside -> clear errors naming the argument (or the right answer)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_masked_cross_entropy_mixed_dtypes_promote(backend):
    """float64 h with a float32 weight (and a float16 bias): the GEMM runs in the promoted dtype on both
    backends (the reference raised 'expected m1 and m2 to have the same dtype')."""
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(10, dtype=torch.float16, requires_grad=True)
    t = torch.randint(0, 10, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1:4] = True
    with use_backend(backend, op="masked_cross_entropy"):
        loss = kernels.masked_cross_entropy(h, w, b, t, mask)
        loss.backward()
    h64, w64, b64 = (x.detach().double().requires_grad_(True) for x in (h, w, b))
    expected = F.cross_entropy(h64[mask] @ w64.t() + b64, t[mask])
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    assert (h.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float64, torch.float32, torch.float16)
    torch.testing.assert_close(h.grad, h64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_meta_tensors_propagate_shapes_or_raise_clearly():
    meta = torch.device("meta")
    z, cb = torch.randn(4, 6, 8, device=meta), torch.randn(16, 8, device=meta)
    idx, z_q, sim = kernels.nearest_code(z, cb)  # was: "Tensor.item() cannot be called on meta tensors"
    assert idx.shape == (4, 6) and z_q.shape == (4, 6, 8) and sim.shape == (4, 6) and idx.device == meta
    assert kernels.nearest_code(z, cb, normalize=False).indices.shape == (4, 6)
    state = (torch.randn(16, 8, device=meta), torch.zeros(16, device=meta), torch.zeros(16, 8, device=meta))
    counts = kernels.ema_codebook_update(*state, z, idx)
    assert counts.shape == (16,) and counts.device == meta
    usage = kernels.codebook_usage(idx, 16)
    assert usage["perplexity"].device == meta
    with pytest.raises(ValueError, match="z is a meta tensor"):
        kernels.kmeans_init_codebook(z, 4)

    q = torch.randn(2, 3, 5, 8, device=meta)
    assert kernels.attention(q, q, q, bias=torch.zeros(3, 5, 5, device=meta)).shape == (2, 3, 5, 8)
    x, act = torch.randn(2, 4, 8, 8, device=meta), torch.ones(2, 8, 8, dtype=torch.bool, device=meta)
    y, act_y = kernels.sparse_conv2d(x, act, torch.randn(6, 4, 3, 3, device=meta), None, stride=2, padding=1)
    assert y.shape == (2, 6, 4, 4) and act_y.shape == (2, 4, 4)

    h, mask = torch.randn(2, 6, 8, device=meta), torch.zeros(2, 6, dtype=torch.bool, device=meta)
    assert kernels.gather_masked(h, mask, num_masked=3).shape == (6, 8)
    with pytest.raises(ValueError, match="num_masked"):
        kernels.gather_masked(h, mask)  # a data-dependent row count
    w, t = torch.randn(10, 8, device=meta), torch.zeros(2, 6, dtype=torch.int64, device=meta)
    assert kernels.masked_cross_entropy(h, w, None, t, mask).shape == ()
    assert kernels.masked_cross_entropy(h, w, None, t, mask, num_masked=3).shape == ()


@pytest.mark.parametrize("call,exc,arg", [
    (lambda: kernels.nearest_code(torch.randn(4, 8), torch.randn(16, 8, device="meta")), ValueError, "same device"),
    (lambda: kernels.commitment_loss(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError, "same device"),
    (lambda: kernels.nearest_code(torch.randn(4, 8), torch.randn(16, 8), eps=0.0), ValueError, "eps"),
    (lambda: kernels.nearest_code(torch.randn(4, 8), torch.randn(16, 8), eps=float("nan")), ValueError, "eps"),
    (lambda: kernels.ema_codebook_update(torch.randn(1, 8).expand(16, 8), torch.zeros(16), torch.zeros(16, 8),
                                         torch.randn(4, 8), torch.zeros(4, dtype=torch.int64)), ValueError, "codebook"),
    (lambda: kernels.ema_codebook_update(torch.randn(16, 8), torch.zeros(16), torch.zeros(16, 8), torch.randn(4, 8),
                                         torch.zeros(4, dtype=torch.int64), decay="0.9"), TypeError, "decay"),
    (lambda: kernels.kmeans_init_codebook(torch.randn(32, 8), 4, seed="1"), TypeError, "seed"),
    (lambda: kernels.VectorQuantizer(num_codes=8.5, dim=4), TypeError, "num_codes"),
    (lambda: kernels.VectorQuantizer(num_codes=8, dim=4, decay=2.0), ValueError, "decay"),
    (lambda: kernels.attention(*(torch.randn(1, 1, 4, 8),) * 3, scale=float("nan")), ValueError, "scale"),
    (lambda: kernels.attention(*(torch.randn(1, 1, 4, 8),) * 3, scale=float("inf")), ValueError, "scale"),
    (lambda: kernels.attention(*(torch.randn(1, 1, 4, 8),) * 3, scale=True), TypeError, "scale"),
    (lambda: kernels.MultiheadSelfAttention(16, 4)(torch.randn(2, 5, 16, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: kernels.MultiheadSelfAttention(16, 4)(torch.randint(0, 3, (2, 5, 16))), TypeError, "floating"),
    (lambda: kernels.MultiheadSelfAttention(16, 4)(torch.randn(2, 5, 16, device="meta")), ValueError, "on meta"),
    (lambda: kernels.masked_cross_entropy(torch.randn(2, 6, 8), torch.randn(10, 8), None,
                                          torch.zeros(2, 6, dtype=torch.int64), chunk_rows=0), ValueError, "chunk_rows"),
    (lambda: kernels.masked_cross_entropy(torch.randn(2, 6, 8), torch.randn(10, 8), None,
                                          torch.zeros(2, 6, dtype=torch.int64), chunk_rows=2.5), ValueError, "chunk_rows"),
])
def test_hostile_arguments_raise_clear_errors(call, exc, arg):
    with pytest.raises(exc, match=arg):
        call()


_X, _ACT = torch.randn(2, 4, 8, 8), torch.rand(2, 8, 8) > 0.4
_W = torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kwargs,weight,arg", [
    (dict(stride=2**40, padding=1), _W, "stride"),
    (dict(stride=2**31, padding=1), _W, "stride"),
    (dict(padding=2**40), _W, "padding"),
    (dict(padding=2**31), _W, "padding"),
    (dict(padding=2**20), _W, "padding"),  # a 2097158 x 2097158 output: 5e13 elements
    (dict(dilation=2**40, padding=1), _W, "dilation"),
    (dict(padding=2**62), _W, "padding"),
    (dict(), _W[..., :0, :0], "weight"),
    (dict(padding=1), _W[:0], "weight"),
], ids=["stride_2e40", "stride_2e31", "padding_2e40", "padding_2e31", "padding_2e20", "dilation_2e40",
        "padding_2e62", "kernel_0x0", "cout_0"])
def test_sparse_conv_huge_or_empty_geometry_raises_a_clear_error(backend, kwargs, weight, arg):
    with use_backend(backend, op="sparse_conv2d"), pytest.raises(ValueError, match=arg):
        kernels.sparse_conv2d(_X, _ACT, weight, None, **kwargs)


def test_downsample_active_with_a_huge_stride_is_one_cell():
    from kernels.sparse_conv.active import downsample_active

    out = downsample_active(_ACT, (2**40, 2**40), (1, 1))  # used to allocate [2, 2**40, 2**40]
    assert out.shape == (2, 1, 1) and torch.equal(out.flatten(), _ACT.flatten(1).any(1))
    out = downsample_active(_ACT, (3, 2**40), (4, 2))  # cells past the input are inactive
    assert out.shape == (2, 4, 2) and not out[:, 3:].any() and not out[:, :, 1:].any()
    expected = torch.stack([_ACT[:, 3 * i:3 * i + 3].flatten(1).any(1) for i in range(3)], 1)  # rows 0-2, 3-5, 6-7
    assert torch.equal(out[:, :3, 0], expected)


def test_ema_out_of_range_indices_without_checks_are_skipped_not_written():
    """check_inputs=False with indices outside [0, K): the Triton scatter wrote out of bounds (heap corruption
    under the interpreter, an illegal address on a GPU) and the reference raised from index_add_; both now skip
    those rows. Run in a fresh interpreter so a crash fails the test."""
    proc = _run_isolated("""
        import torch, kernels
        torch.manual_seed(0)
        for backend in ("reference", "triton"):
            cb = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
            cl, es = torch.zeros(16), torch.zeros(16, 8)
            z = torch.randn(64, 8)
            idx = torch.randint(0, 16, (64,))
            idx[::3] += 1000
            idx[1::7] = -5
            with kernels.use_backend(backend):
                counts = kernels.ema_codebook_update(cb, cl, es, z, idx, check_inputs=False)
            ok = (idx >= 0) & (idx < 16)
            assert torch.equal(counts, torch.bincount(idx[ok], minlength=16).float()), backend
            assert torch.isfinite(cb).all()
        print("OK")
        """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (proc.returncode, proc.stderr[-2000:])
