"""VQ-KD nearest-code lookup, ours vs the public anchors (the EMA update: test_bench_ema_codebook_update.py).

GPU shape: BEiT v2 tokenizer batch, M = 256 * 196 = 50,176 vectors, K = 8192 codes, d = 32 (tiny under the GPU
plan's dry run; ``ours`` is the Triton path there, the interpreter).
CPU shape: M = 4,099, K = 1,000, d = 32 (our CPU path is the chunked reference; Triton is GPU-only here).

Providers: ``ours`` (fused Triton kernel on CUDA, no [M, K] scores; float32 -> the tf32x3 default (three TF32
tensor-core passes), bfloat16 z -> bf16 operands), ``reference`` = the unilm norm_ema_quantizer way (full [M, K] fp32 distance
matrix + argmin + gather), ``compile`` (``torch.compile`` of that anchor; CUDA only), ``faiss`` (exact
inner-product search): on CUDA only faiss-gpu on the torch CUDA tensors (no host copies) makes a row, so a
machine without faiss-gpu reports the skip and its reason instead of a CPU-faiss time.
Variants of ours for float32 z (CUDA only): ``ours-bf16ops`` (``precision="bf16"``: bf16 GEMM operands, fp32
accumulation, exact fp32 similarity of the pick), ``ours-tf32`` (one TF32 pass), ``ours-ieee`` (FMA units), and
``ours-cached`` (the default precision with ``cache_codebook=True``: the prepared codebook reused, as the
VectorQuantizer does between EMA steps; ``ours`` minus it is the preparation's cost).

flops: 2*M*K*d (score GEMM). bytes_moved: the minimal traffic: z, codebook, indices, z_q, similarity.
extra_info ``peak_memory_bytes`` (CUDA: bytes above the inputs) for every provider.

The shapes and helpers below (``codebook_inputs``, ``compiled_anchor``, ``on_triton``, ...) are shared with the
EMA bench.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import COMPILE, DRY_RUN, GPU, peak_memory, sized
from kernels import nearest_code, use_backend

GPU_SHAPE = sized((50_176, 8192, 32), (300, 96, 32))
CPU = (4_099, 1_000, 32)
GPU_DEV = str(GPU)


def _unilm_lookup(z, codebook):
    """Anchor: unilm beit2 norm_ema_quantizer -- full [M, K] distance matrix, argmin, gather."""
    zf = F.normalize(z.float(), dim=-1)
    cb = F.normalize(codebook.float(), dim=-1)
    dist = zf.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1) - 2 * zf @ cb.t()
    idx = dist.argmin(1)
    return idx, cb[idx]


def compiled_anchor(fn, dev, *args):
    """``torch.compile`` of an anchor, warmed up; CUDA only (compiling on a 2-core CPU takes minutes), skipped
    with the compiler's error if it fails."""
    if dev != "cuda" or DRY_RUN:
        pytest.skip("torch.compile provider is benchmarked on CUDA only")
    compiled = torch.compile(fn)
    try:
        compiled(*args)
    except Exception as exc:  # noqa: BLE001 - reported as a skip, not a failure of our kernels
        pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return lambda: compiled(*args)


def codebook_inputs(M, K, d, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    codebook = F.normalize(torch.randn(K, d, generator=g), dim=-1).to(device)
    z = torch.randn(M, d, generator=g).to(device=device, dtype=dtype)
    return z, codebook


def bench_provider(bench, provider, ours, anchor, compile_anchor, device, common):
    """The providers both codebook benches have: ``ours`` (timed against the anchor), the ``reference`` anchor
    and its ``compile`` (built by ``compile_anchor()``, which skips off CUDA)."""
    fn = {"ours": ours, "reference": anchor}.get(provider) or compile_anchor()
    against = {"reference": anchor} if provider == "ours" else {}
    bench(fn, provider=provider, **against, peak_memory_bytes=peak_memory(fn, device), **common)


GPU_MARKS = [pytest.mark.cuda, pytest.mark.headline]


def _lookup_cases():
    return [
        pytest.param(GPU_SHAPE, "float32", GPU_DEV, marks=GPU_MARKS, id="gpu-fp32"),
        pytest.param(GPU_SHAPE, "bfloat16", GPU_DEV, marks=GPU_MARKS, id="gpu-bf16"),
        pytest.param(CPU, "float32", "cpu", id="cpu-fp32"),
    ]


def gpu_case(shape) -> bool:
    return shape == GPU_SHAPE and (DRY_RUN or GPU.type == "cuda")


def on_triton(fn, shape):
    """On the GPU cases ``ours`` is the Triton path (CUDA's default; forced for the interpreter under the dry run)."""
    if not gpu_case(shape):
        return fn

    def run():
        with use_backend("triton"):
            return fn()

    return run


VARIANTS = {"ours-bf16ops": dict(precision="bf16"), "ours-tf32": dict(precision="tf32"),
            "ours-ieee": dict(precision="ieee"), "ours-cached": dict(cache_codebook=True)}


@pytest.mark.parametrize("shape,dtype,dev", _lookup_cases())
@pytest.mark.parametrize("provider", ["ours", *VARIANTS, "reference", COMPILE, "faiss"])
def test_bench_nearest_code(bench, shape, dtype, dev, provider):
    M, K, d = shape
    dtype = getattr(torch, dtype)  # parametrised by name: pytest-benchmark stores params as JSON
    device = torch.device(dev)
    z, codebook = codebook_inputs(M, K, d, dtype, device)
    es = z.element_size()
    common = {
        "kernel": "nearest_code",
        "shape": f"M{M} K{K} d{d}",
        "dtype": dtype,
        "device": device,
        "flops": 2 * M * K * d,
        "bytes_moved": M * d * es + K * d * 4 + M * (8 + 4 + d * 4),
    }

    ours = on_triton(lambda: nearest_code(z, codebook, check_finite=False), shape)

    def anchor():
        return _unilm_lookup(z, codebook)

    if provider in VARIANTS:
        if dtype != torch.float32 or not gpu_case(shape):
            pytest.skip(f"{provider} for float32 inputs: a CUDA-only variant")
        kw = VARIANTS[provider]
        bench(on_triton(lambda: nearest_code(z, codebook, check_finite=False, **kw), shape), provider=provider,
              **common)
    elif provider == "ours":
        with torch.no_grad():
            got = ours().indices
            want = anchor()[0]
        # near-ties may flip in reduced precision: compare by similarity, not by index
        zn = F.normalize(z.float(), dim=-1)
        gap = (zn * codebook[want]).sum(-1) - (zn * codebook[got]).sum(-1)
        assert gap.max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    if provider in ("ours", "reference", "compile"):
        bench_provider(bench, provider, ours, anchor, lambda: compiled_anchor(_unilm_lookup, dev, z, codebook),
                       device, common)
    elif provider == "faiss":
        if importlib.util.find_spec("faiss") is None:
            pytest.skip("faiss is not installed (no faiss row)")
        import faiss

        if device.type == "cuda":
            # a fair GPU peer: faiss-gpu searching torch CUDA tensors in place (no host copies), the query
            # normalisation inside the timed call as in ours; CPU faiss would be timed on host copies, so no row
            if not hasattr(faiss, "StandardGpuResources"):
                pytest.skip("faiss has no GPU support in this build (faiss-gpu not installed): no fair GPU peer")
            import faiss.contrib.torch_utils  # noqa: F401 - lets GPU indexes take torch CUDA tensors

            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, d)
            index.add(codebook.float().contiguous())
            search = lambda: index.search(F.normalize(z.float(), dim=-1), 1)  # noqa: E731
            note = "faiss-gpu GpuIndexFlatIP (exact, fp32) on torch CUDA tensors; query normalisation timed"
        else:
            index = faiss.IndexFlatIP(d)
            index.add(codebook.cpu().numpy())
            zn = F.normalize(z.float(), dim=-1).cpu().numpy()
            search = lambda: index.search(zn, 1)  # noqa: E731
            note = "faiss CPU IndexFlatIP on numpy arrays (normalised once, outside the timed call)"
        bench(search, provider="faiss", note=note, **common)
