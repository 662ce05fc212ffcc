"""VQ-KD codebook EMA update, ours vs the public anchors (shapes and helpers: test_bench_nearest_code.py).

GPU shape: BEiT v2 tokenizer batch, M = 50,176 vectors, K = 8192 codes, d = 32 (tiny under the GPU plan's dry
run; ``ours`` is the Triton path there, the interpreter). CPU shape: M = 4,099, K = 1,000, d = 32.

Providers: ``ours`` (scatter-add + fused finalize), ``reference`` = unilm's one-hot [M, K] matrix + dense
GEMM, ``compile`` (``torch.compile`` of it; CUDA only), ``torch-index_add`` (our pure-PyTorch path).

flops: the minimal arithmetic 4*M*d + 12*K*d (normalise + scatter, finalize), with the anchor's one-hot GEMM
work 2*M*K*d in extra_info (anchor_flops). bytes_moved: z, indices, codebook read + written, sums, counts.
extra_info ``peak_memory_bytes`` (CUDA: bytes above the inputs) for every provider.
"""

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import COMPILE, peak_memory
from bench.test_bench_nearest_code import (
    CPU, GPU_DEV, GPU_MARKS, GPU_SHAPE, bench_provider, codebook_inputs, compiled_anchor, on_triton,
)
from kernels import ema_codebook_update
from kernels.codebook import reference as ref


def _unilm_ema(codebook, cluster_size, z, indices, decay=0.99):
    """Anchor: one-hot [M, K] matrix, dense GEMM for the sums, then norm-EMA (fp32)."""
    K = codebook.shape[0]
    onehot = F.one_hot(indices, K).float()
    bins = onehot.sum(0)
    cluster_size.mul_(decay).add_(bins, alpha=1 - decay)
    zero = bins == 0
    embed_sum = F.normalize(z.float(), dim=-1).t() @ onehot
    mean = F.normalize((embed_sum / bins.masked_fill(zero, 1.0)[None]).t(), dim=-1)
    mean = torch.where(zero[:, None], codebook, mean)
    codebook.mul_(decay).add_(mean, alpha=1 - decay)
    codebook.copy_(F.normalize(codebook, dim=-1))


def _ema_cases():
    return [
        pytest.param(GPU_SHAPE, GPU_DEV, marks=GPU_MARKS, id="gpu"),
        pytest.param(CPU, "cpu", id="cpu"),
    ]


@pytest.mark.parametrize("shape,dev", _ema_cases())
@pytest.mark.parametrize("provider", ["ours", "reference", COMPILE, "torch-index_add"])
def test_bench_ema_update(bench, shape, dev, provider):
    M, K, d = shape
    device = torch.device(dev)
    z, codebook = codebook_inputs(M, K, d, torch.float32, device)
    z = F.normalize(z, dim=-1)
    indices = torch.randint(0, K, (M,), device=device)
    cluster, embed_sum = torch.zeros(K, device=device), torch.zeros(K, d, device=device)
    common = {
        "kernel": "codebook_ema_update",
        "shape": f"M{M} K{K} d{d}",
        "dtype": torch.float32,
        "device": device,
        "flops": 4 * M * d + 12 * K * d,
        "anchor_flops": 2 * M * K * d,
        "bytes_moved": M * d * 4 + M * 8 + 4 * K * d * 4 + 3 * K * 4,
    }
    cb_anchor, cl_anchor = codebook.clone(), cluster.clone()

    def anchor():
        _unilm_ema(cb_anchor, cl_anchor, z, indices)

    ours = on_triton(lambda: ema_codebook_update(codebook, cluster, embed_sum, z, indices, check_inputs=False), shape)

    if provider in ("ours", "reference", "compile"):
        bench_provider(bench, provider, ours, anchor,
                       lambda: compiled_anchor(_unilm_ema, dev, cb_anchor, cl_anchor, z, indices), device, common)
    else:
        cb2, cl2 = codebook.clone(), cluster.clone()
        es2 = torch.zeros_like(embed_sum)

        def index_add():
            counts, sums = ref.ema_scatter_reference(z, indices, K, True, 1e-5)
            es2.copy_(sums)
            ref.ema_finalize_reference(cb2, cl2, counts, es2, 0.99, 1e-5, True)

        bench(index_add, provider="torch-index_add", peak_memory_bytes=peak_memory(index_add, device), **common)
