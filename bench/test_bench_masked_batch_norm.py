"""Masked batch norm (SparseBatchNorm2d's training-mode op: statistics over the active sites only), fwd and fwd + bwd.

CPU (batch 4, 160-px images, 64 channels at 40 x 40, channels_last, one thread): the C++ path ("ours") vs the
pure-PyTorch reference and the dense ``F.batch_norm`` SparK's official code runs, re-masked. CUDA (ResNet-50
stage 1: 256 channels at 56 x 56, batch 32, bf16): Triton vs the same. SparK masks: ratio 0.6 on 32-px units.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.conftest import GPU, sized
from bench.test_bench_sparse_conv2d import cudnn_benchmark, one_thread  # noqa: F401 (fixtures)
from kernels import masked_batch_norm, use_backend
from kernels.sparse_conv import upsample_active
from kernels.sparse_conv.reference import masked_batch_norm_reference

RATIO = 0.6




def _bn_case(batch, image, channels, in_stride, dtype, device):
    units = image // 32
    keep = ~kernels.spark_masks(batch, units, units, RATIO, seed=0)
    res = image // in_stride
    active = upsample_active(keep, res // units).to(device)
    x = torch.randn(batch, channels, res, res, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x = (x * active.unsqueeze(1)).requires_grad_()
    w = torch.ones(channels, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(channels, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    return x, active, w, b, g


def _bn_fn(provider, x, active, w, b, g, phase, force_triton=False):
    def ours():  # Triton on CUDA (and the GPU cases of the dry run), C++ on CPU
        with use_backend("triton" if (x.is_cuda or force_triton) else "native", op="masked_batch_norm"):
            return masked_batch_norm(x, active, w, b)[0]

    forward = {
        "ours": ours,
        "reference": lambda: masked_batch_norm_reference(x, active, w, b)[0],
        # the dense op SparK's official code runs (over every site, masked ones included), then re-masks
        "dense-bn-remask": lambda: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5) * active.unsqueeze(1),
    }[provider]

    def run():
        with torch.set_grad_enabled(phase != "fwd"):
            y = forward()
            return y if phase == "fwd" else torch.autograd.grad(y, [x, w, b], g)

    return run


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "reference", "dense-bn-remask"])
def test_masked_batch_norm_cpu(bench, one_thread, provider, phase):
    x, active, w, b, g = _bn_case(4, 160, 64, 4, torch.float32, "cpu")
    bench(_bn_fn(provider, x, active, w, b, g, phase), kernel="masked_batch_norm", provider=provider,
          shape=f"B4 160px 64ch @40 channels_last {phase}", dtype=torch.float32, device="cpu", threads=one_thread)


@pytest.mark.cuda
@pytest.mark.headline
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "reference", "dense-bn-remask"])
def test_masked_batch_norm_cuda(bench, cudnn_benchmark, provider, phase):
    """ResNet-50 stage 1 (256 channels at 56 x 56, batch 32, bf16, channels_last), 60% masked."""
    batch, image, ch = sized((32, 224, 256), (2, 64, 32))
    x, active, w, b, g = _bn_case(batch, image, ch, 4, torch.bfloat16, GPU)
    elems = x.numel()
    nbytes = (3 if phase == "fwd" else 8) * elems * x.element_size()  # see kernels/sparse_conv/masked_batch_norm_triton.py
    bench(_bn_fn(provider, x, active, w, b, g, phase, force_triton=True), kernel="masked_batch_norm",
          provider=provider, shape=f"B{batch} {image}px {ch}ch @{image // 4} channels_last {phase}",
          dtype=torch.bfloat16, device=GPU, bytes_moved=nbytes)
