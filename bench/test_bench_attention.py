"""Attention with a learnable relative position bias: ours (Triton) vs SDPA backends and peers.

Shapes: ViT-B/16 at 224 px (B=256, H=12, N=197, d=64; the GPU plan's headline) and ViT-S/16 DINO local crops
(N=37 at 96 px, N=50 at 112 px; H=6, d=64, B=1024 crops), bf16 (tiny shapes under the plan's dry run), forward and forward+backward, with a bias shared over
the batch ([H, N, N], requires grad, as BEiT's shared relative position bias) and without.
Peers: F.scaled_dot_product_attention restricted to each backend with ``sdpa_kernel`` (a backend that
rejects the inputs, e.g. flash with a bias, is skipped with its reason), ``torch.compile`` of our reference
(``compile``), flash-attn and xformers when importable. GPU cases are marked cuda; the CPU cases compare our reference path with SDPA's math.

flops: model FLOPs, 4*B*H*N^2*d forward, 3.5x that for forward+backward (no recompute counted; our kernels
issue 2 + 7 tile GEMMs over N padded to the tiles, 4.5x the forward's -- kernels/attn/attention_triton.py gives
the cost model and bench/targets.py the floors at the ViT-B shape).
bytes_moved: the minimal traffic: q, k, v, o (+ the bias) forward; forward plus q, k, v, o, dO read,
dq, dk, dv written (+ bias read, dbias written in float32) and the log-sum-exp/delta rows backward.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import COMPILE, DRY_RUN, GPU, sized
from bench.timing import autograd_step
from kernels import RelativePositionBias, attention, use_backend

GPU_SHAPES = sized({
    "vitb_n197": (256, 12, 197, 64),
    "vits_local_n37": (1024, 6, 37, 64),
    "vits_local_n50": (1024, 6, 50, 64),
}, {"vitb_n197": (2, 2, 37, 16), "vits_local_n37": (2, 2, 13, 16), "vits_local_n50": (2, 2, 21, 16)})
HEADLINE = "vitb_n197"  # the ViT-B/BEiT shape of the targets: the GPU plan's headline rows


def _shape_str(B, H, N, d, with_bias):
    return f"B{B} H{H} N{N} d{d}" + (" +bias[H,N,N]" if with_bias else "")


def _flops(B, H, N, d, backward):
    fwd = 4 * B * H * N * N * d
    return int(fwd * (3.5 if backward else 1.0))


def _bytes(B, H, N, d, es, with_bias, backward):
    act = B * H * N * d * es
    bias = H * N * N * 4 if with_bias else 0
    rows = B * H * N * 4
    fwd = 4 * act + bias + rows
    if not backward:
        return fwd
    return fwd + 8 * act + 2 * rows + bias + (H * N * N * 4 if with_bias else 0)


def _inputs(B, H, N, d, dtype, device, with_bias, grad):
    q, k, v = (torch.randn(B, H, N, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    bias = (torch.randn(H, N, N, device=device) * 0.1).requires_grad_(grad) if with_bias else None
    return q, k, v, bias


def _step(forward, tensors, backward):
    """A callable running ``forward()`` and, for fwd+bwd, the gradients of every input."""
    leaves = getattr(forward, "leaves", None) or [t for t in tensors if t is not None and t.requires_grad]
    return autograd_step(forward, leaves, backward)


def _sdpa_forward(backend, q, k, v, bias):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend)

    def fwd():
        mask = bias.to(q.dtype) if bias is not None else None  # SDPA wants the mask in q's dtype
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return fwd


def _peer_forward(provider, q, k, v, bias):
    if provider == "ours":
        def fwd():
            with use_backend("triton", op="attention"):
                return attention(q, k, v, bias)
        return fwd
    if provider.startswith("sdpa-"):
        return _sdpa_forward(provider[5:].upper(), q, k, v, bias)
    if provider == "compile":
        from kernels.attn.reference import attention_reference

        compiled = torch.compile(attention_reference)
        return lambda: compiled(q, k, v, bias)
    if provider == "flash-attn":
        if bias is not None:
            pytest.skip("flash-attn has no additive bias")
        from flash_attn import flash_attn_func

        return lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if provider == "xformers":
        import xformers.ops as xops

        B, H, N, _ = q.shape
        storage = None
        if bias is not None:
            # xformers wants the bias's last dim padded to a multiple of 8, then sliced back
            storage = torch.zeros(H, N, (N + 7) // 8 * 8, device=q.device, dtype=q.dtype)
            storage[..., :N] = bias.detach()
            storage.requires_grad_(bias.requires_grad)

        def fwd():
            attn_bias = storage[..., :N].unsqueeze(0).expand(B, H, N, N) if storage is not None else None
            return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_bias=attn_bias)

        fwd.leaves = [t for t in (q, k, v, storage) if t is not None and t.requires_grad]
        return fwd
    raise ValueError(provider)


# no "ours-deterministic" row any more: the backward has no atomics, so deterministic=True runs the same kernels
PROVIDERS = ["ours", "sdpa-efficient_attention", "sdpa-cudnn_attention",
             "sdpa-flash_attention", "sdpa-math", COMPILE, "flash-attn", "xformers"]


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape_name", [
    pytest.param(n, marks=pytest.mark.headline, id=n) if n == HEADLINE else n for n in GPU_SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_gpu(bench, provider, shape_name, with_bias, backward):
    if provider == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    if provider == "xformers" and importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed")
    if provider == "compile" and DRY_RUN:
        pytest.skip("torch.compile is not part of the dry run (minutes on a 2-core CPU)")
    B, H, N, d = GPU_SHAPES[shape_name]
    dtype = torch.bfloat16
    q, k, v, bias = _inputs(B, H, N, d, dtype, GPU, with_bias, backward)
    fn = _step(_peer_forward(provider, q, k, v, bias), (q, k, v, bias), backward)
    try:
        fn()
        if GPU.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - an SDPA backend that refuses these inputs, a failed compile
        pytest.skip(f"{provider} cannot run this case: {str(exc).splitlines()[0][:200]}")
    reference = None
    if provider == "ours":  # SDPA's memory-efficient kernel (the one that takes a bias); math under the dry run
        reference = _step(_sdpa_forward("MATH" if DRY_RUN else "EFFICIENT_ATTENTION", q, k, v, bias), (q, k, v, bias),
                          backward)
    note = None
    if provider.startswith("sdpa-") and bias is not None:
        note = "given the fp32 [H,N,N] bias cast to bf16 inside the timed call (SDPA takes the mask in q's dtype)"
    graphs = True
    if provider.startswith("ours"):  # the graph time is the kernels alone, whatever the eager call adds
        graphs = "always"
        if os.environ.get("KERNELS_CHECK_OVERFLOW", "") not in ("", "0"):
            note = ("KERNELS_CHECK_OVERFLOW=1: eager calls include the overflow check (a sum over the output + a "
                    "host sync); the graph time leaves it out (skipped under capture)")
    bench(fn, kernel="attention " + ("fwd+bwd" if backward else "fwd"), provider=provider,
          shape=_shape_str(B, H, N, d, with_bias), dtype=dtype, device=GPU, reference=reference,
          flops=_flops(B, H, N, d, backward), bytes_moved=_bytes(B, H, N, d, 2, with_bias, backward), note=note,
          graphs=graphs)


@pytest.mark.cuda
@pytest.mark.parametrize("window,heads", [pytest.param((14, 14), 12, marks=pytest.mark.headline, id="14x14-H12"),
                                          pytest.param((6, 6), 6, id="6x6-H6")])
def test_relative_position_bias_gather_gpu(bench, window, heads):
    """The plain-indexing gather + its backward, to compare with the attention it feeds."""
    rpb = RelativePositionBias(window, heads).to(GPU)
    n = window[0] * window[1] + 1
    fn = _step(rpb, list(rpb.parameters()), True)
    bench(fn, kernel="rel_pos_bias gather fwd+bwd", provider="ours", shape=f"{window[0]}x{window[1]} H{heads}",
          dtype=torch.float32, device=GPU, bytes_moved=2 * heads * n * n * (4 + 8))


# ------------------------------------------------------------------------------------------------------------
# CPU: our reference path vs SDPA (math / CPU flash) so the file measures something without a GPU


CPU_SHAPE = (8, 6, 50, 64)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["reference", "sdpa-math", "sdpa-default"])
def test_attention_cpu(bench, provider, backward):
    B, H, N, d = CPU_SHAPE
    dtype = torch.float32
    q, k, v, bias = _inputs(B, H, N, d, dtype, "cpu", True, backward)
    if provider == "reference":
        forward = lambda: attention(q, k, v, bias)  # the CPU default backend: the reference
    elif provider == "sdpa-math":
        forward = _sdpa_forward("MATH", q, k, v, bias)
    else:
        forward = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    fn = _step(forward, (q, k, v, bias), backward)
    out = fn()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-5, rtol=1e-4)
    bench(fn, kernel="attention " + ("fwd+bwd" if backward else "fwd"), provider=provider,
          shape=_shape_str(B, H, N, d, True), dtype=dtype, device="cpu", rounds=10,
          flops=_flops(B, H, N, d, backward), bytes_moved=_bytes(B, H, N, d, 4, True, backward))


def test_relative_position_bias_gather_cpu(bench):
    rpb = RelativePositionBias((14, 14), 12)
    fn = _step(rpb, list(rpb.parameters()), True)
    bench(fn, kernel="rel_pos_bias gather fwd+bwd", provider="ours", shape="14x14 H12", dtype=torch.float32,
          device="cpu", rounds=20, bytes_moved=2 * 12 * 197 * 197 * (4 + 8))
