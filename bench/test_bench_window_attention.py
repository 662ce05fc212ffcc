"""Swin window attention (relative position bias + shifted-window mask): ours (fused Triton) vs the eager timm
block, SDPA with the bias materialised, and FlexAttention with a score_mod.

Shapes: the four stages of Swin-B (embed 128, heads 4-8-16-32, d = 32) at batch 128, ``[B*nW, H, N, d]``:

    192 px, window 6 (SimMIM pre-training; maps 48/24/12/6):  [8192, 4, 36, 32] [2048, 8, 36, 32] [512, 16, 36, 32] [128, 32, 36, 32]
    224 px, window 7 (fine-tuning; maps 56/28/14/7):          [8192, 4, 49, 32] [2048, 8, 49, 32] [512, 16, 49, 32] [128, 32, 49, 32]

stages 1-3 with the shifted-window mask ([nW, N, N] = [64|16|4, N, N]; Swin's odd blocks), stage 4 one window per
image and no mask. bf16 activations, the fp32 bias gathered from its table (as under autocast), forward and
forward+backward (gradients of q, k, v and the bias). Tiny shapes under the GPU plan's dry run.

Peers: ``eager-timm`` (``attn + bias.unsqueeze(0)``, ``attn.view(-1, nW, H, N, N) + mask``, softmax, ``@ v``: the
non-fused path of timm and the official code), ``sdpa`` (F.scaled_dot_product_attention given timm's fused-path
mask ``bias + mask.view(1, nW, 1, N, N)`` expanded to [B*nW, H, N, N] in q's dtype inside the timed call, as timm
builds it every call), ``flex`` (torch.compile'd flex_attention with ``score + bias[h, q, k] + mask[b % nW, q, k]``,
where importable), ``compile`` (torch.compile of the eager block). ``ours`` carries the eager block as reference.

flops: model FLOPs, 4*BW*H*N^2*d forward, 3.5x that for forward+backward (the convention of
test_bench_attention.py). bytes_moved: the minimal traffic of the fused kernels: q, k, v read and o written, plus
the bias and mask tables, forward; backward q, k, v, dO read and dq, dk, dv written (no O, no log-sum-exp: P is
recomputed from the tile), the tables read again and the float32 dbias written. ``peak_memory_bytes``: CUDA
allocator peak above the inputs (the eager and SDPA paths hold [B*nW, H, N, N] tensors).
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import COMPILE, DRY_RUN, GPU, peak_memory, sized
from bench.timing import autograd_step
from kernels import use_backend, window_attention

B = 128  # images (SimMIM's 128 per GPU)


def _stages(img, window):
    grid, heads, out = img // 4, (4, 8, 16, 32), {}
    for i, h in enumerate(heads):
        side = grid // 2 ** i
        nw = (side // window) ** 2
        out[f"swinb{img}_s{i + 1}"] = (B * nw, nw if i < 3 else 1, h, window * window, 32, i < 3)
    return out


GPU_SHAPES = sized({**_stages(192, 6), **_stages(224, 7)}, {
    # BW, nW, H, N, d, shifted
    "swinb192_s1": (8, 4, 2, 36, 32, True), "swinb224_s1": (8, 4, 2, 49, 32, True),
    "swinb192_s4": (4, 1, 4, 36, 32, False),
})
HEADLINE = "swinb192_s1"  # SimMIM's pre-training resolution, the largest stage


def _shape_str(BW, nW, H, N, d, shifted):
    return f"BW{BW} H{H} N{N} d{d} +bias[H,N,N]" + (f" +mask[{nW},N,N]" if shifted else "")


def _flops(BW, H, N, d, backward):
    return int(4 * BW * H * N * N * d * (3.5 if backward else 1.0))


def _bytes(BW, nW, H, N, d, es, shifted, backward):
    act = BW * H * N * d * es
    tables = H * N * N * 4 + (nW * N * N * 4 if shifted else 0)
    fwd = 4 * act + tables
    return fwd if not backward else fwd + 7 * act + tables + H * N * N * 4


def _inputs(BW, nW, H, N, d, shifted, dtype, device, grad):
    qkv = torch.randn(BW, N, 3, H, d, device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_(grad) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # Swin's views
    table = (torch.randn((2 * int(N ** 0.5) - 1) ** 2, H, device=device) * 0.02).requires_grad_(grad)
    side = int(N ** 0.5)
    ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = torch.stack([ii.flatten(), jj.flatten()])
    rel = c[:, :, None] - c[:, None, :]
    index = ((rel[0] + side - 1) * (2 * side - 1) + rel[1] + side - 1).to(device)
    mask = None
    if shifted:
        mask = torch.where(torch.rand(nW, N, N, device=device) < 0.3, -100.0, 0.0)  # the values do not matter here
    return q, k, v, table, index, mask


def _bias(table, index, H, N):
    return table[index.reshape(-1)].view(N, N, H).permute(2, 0, 1)  # [H, N, N], the gather every block does


def _forward(provider, q, k, v, table, index, mask):
    BW, H, N, d = q.shape
    scale = d ** -0.5
    if provider == "ours":
        def fwd():
            with use_backend("triton", op="window_attention"):
                return window_attention(q, k, v, _bias(table, index, H, N), mask, scale)
        return fwd

    def eager():  # under autocast as in training: the fp32 bias promotes the scores to fp32, the matmuls run in bf16
        with torch.autocast(q.device.type, dtype=q.dtype, enabled=q.dtype != torch.float32):
            attn = (q * scale) @ k.transpose(-2, -1)
            attn = attn + _bias(table, index, H, N).unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                attn = (attn.view(-1, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, H, N, N)
            return attn.softmax(-1) @ v

    if provider == "eager-timm":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    if provider == "sdpa":
        def fwd():
            attn_mask = _bias(table, index, H, N).unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                m = mask.view(1, nW, 1, N, N).expand(BW // nW, -1, H, -1, -1)
                attn_mask = attn_mask + m.reshape(-1, H, N, N)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return fwd
    if provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
        nW = mask.shape[0] if mask is not None else 1

        def fwd():
            bias = _bias(table, index, H, N)

            if mask is not None:
                def score_mod(score, b, h, qi, ki):
                    return score + bias[h, qi, ki] + mask[b % nW, qi, ki]
            else:
                def score_mod(score, b, h, qi, ki):
                    return score + bias[h, qi, ki]
            return flex(q, k, v, score_mod=score_mod, scale=scale)
        return fwd
    raise ValueError(provider)


PROVIDERS = ["ours", "eager-timm", "sdpa", pytest.param("flex", marks=pytest.mark.compile, id="flex"), COMPILE]


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", [
    pytest.param(n, marks=pytest.mark.headline, id=n) if n == HEADLINE else n for n in GPU_SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_window_attention_gpu(bench, provider, shape_name, backward):
    if provider == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        pytest.skip("FlexAttention is not available in this torch")
    if provider in ("flex", "compile") and DRY_RUN:
        pytest.skip("torch.compile is not part of the dry run (minutes on a 2-core CPU)")
    BW, nW, H, N, d, shifted = GPU_SHAPES[shape_name]
    dtype = torch.bfloat16
    q, k, v, table, index, mask = _inputs(BW, nW, H, N, d, shifted, dtype, GPU, backward)
    leaves = [q, k, v, table]
    fn = autograd_step(_forward(provider, q, k, v, table, index, mask), leaves, backward)
    try:
        out = fn()
        if GPU.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a peer that refuses these inputs or fails to compile
        pytest.skip(f"{provider} cannot run this case: {str(exc).splitlines()[0][:200]}")
    reference = None
    if provider == "ours":
        eager = autograd_step(_forward("eager-timm", q, k, v, table, index, mask), leaves, backward)
        torch.testing.assert_close(out.float(), eager().float(), atol=3e-2, rtol=3e-2)
        reference = eager
    bench(fn, kernel="window_attention " + ("fwd+bwd" if backward else "fwd"), provider=provider,
          shape=_shape_str(BW, nW, H, N, d, shifted), dtype=dtype, device=GPU, reference=reference,
          flops=_flops(BW, H, N, d, backward), bytes_moved=_bytes(BW, nW, H, N, d, 2, shifted, backward),
          peak_memory_bytes=peak_memory(fn, GPU))


# ------------------------------------------------------------------------------------------------------------
# CPU: our CPU path (the reference) vs the eager timm block and SDPA, at a small shifted stage


CPU_SHAPE = (2 * 16, 16, 4, 36, 32, True)  # 2 images, a 24x24 map in 6x6 windows, 4 heads


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["reference", "eager-timm", "sdpa"])
def test_window_attention_cpu(bench, provider, backward):
    BW, nW, H, N, d, shifted = CPU_SHAPE
    q, k, v, table, index, mask = _inputs(BW, nW, H, N, d, shifted, torch.float32, "cpu", backward)
    if provider == "reference":
        forward = lambda: window_attention(q, k, v, _bias(table, index, H, N), mask)  # noqa: E731 - CPU default
    else:
        forward = _forward(provider, q, k, v, table, index, mask)
    fn = autograd_step(forward, [q, k, v, table], backward)
    out = fn()
    torch.testing.assert_close(out, _forward("eager-timm", q, k, v, table, index, mask)(), atol=1e-5, rtol=1e-4)
    bench(fn, kernel="window_attention " + ("fwd+bwd" if backward else "fwd"), provider=provider,
          shape=_shape_str(BW, nW, H, N, d, shifted), dtype=torch.float32, device="cpu", rounds=10,
          flops=_flops(BW, H, N, d, backward), bytes_moved=_bytes(BW, nW, H, N, d, 4, shifted, backward))
