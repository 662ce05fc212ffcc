"""The engine's SparK encoder blocks on their sparse paths (inside a ``sparse_context``) vs the dense block
on the masked input, re-masked: forward and backward in float64 (and float32 with its tolerance), odd sizes,
coarse unit masks, outputs of the native kernels poisoned first."""

import pytest
import torch
from conftest import TOLERANCES, assert_close

import kernels
from kernels._backend import native_reasons
from kernels.sparse_conv import sparse_context, upsample_active

needs_native = pytest.mark.skipif(bool(native_reasons()), reason="kernels._C is not built")


pytestmark = pytest.mark.usefixtures("poison_outputs")  # tests/conftest.py


def _mask(B, gh, gw, unit):
    units = torch.rand(B, gh, gw) < 0.5
    units[:, 0, 0] = True
    units[-1, -1, -1] = False
    return upsample_active(units, unit)


def _compare(dense, sparse, x, active, dtype, params=()):
    """sparse(x) in a context == dense(x * a) * a; grads of x (at active sites) and of every parameter."""
    a = active.unsqueeze(1).to(dtype)
    xd = (x * a).detach().requires_grad_()
    xs = (x * a).detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    yd = dense(xd) * a
    with sparse_context(active):
        ys = sparse(xs)
    atol, rtol = TOLERANCES[dtype]
    assert_close(ys, yd, atol=atol, rtol=rtol, name="output")
    assert (ys.detach() * (1 - a) == 0).all(), "inactive outputs must be exact zeros"
    g = torch.randn_like(yd)
    yd.backward(g)
    ys.backward(g)
    assert_close(xs.grad * a, xd.grad * a, atol=atol * 10, rtol=rtol * 10, name="dx at active sites")
    for (n, ps), (_, pd) in zip(sparse.named_parameters(), dense.named_parameters()):
        assert_close(ps.grad, pd.grad, atol=atol * 10, rtol=rtol * 10, name=f"grad {n}")


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim,H,W,unit", [(8, 14, 10, 2), (13, 9, 15, 3)])
def test_convnext_block_sparse_rows_match_dense(dtype, dim, H, W, unit):
    from engine.models.convnext import ConvNeXtBlock

    torch.manual_seed(1)
    dense = ConvNeXtBlock(dim, layer_scale=0.5).to(dtype)
    for p in dense.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    sparse = ConvNeXtBlock(dim, layer_scale=0.5).to(dtype)
    sparse.load_state_dict(dense.state_dict())
    kernels.to_sparse(sparse)
    active = _mask(3, -(-H // unit), -(-W // unit), unit)[:, :H, :W]
    x = torch.randn(3, dim, H, W, dtype=dtype)
    _compare(dense, sparse, x, active, dtype)


@needs_native
@pytest.mark.native
def test_convnext_block_dense_rows_agree_at_active_sites():
    """gather_rows=False (the bench's dense reference: the MLP on every site) agrees at active sites."""
    from engine.models.convnext import ConvNeXtBlock

    block = ConvNeXtBlock(8, layer_scale=0.5).double()
    kernels.to_sparse(block)
    active = _mask(2, 4, 3, 3)
    x = torch.randn(2, 8, 12, 9, dtype=torch.float64) * active.unsqueeze(1)
    with sparse_context(active):
        rows = block(x)
    with sparse_context(active, gather_rows=False):
        dense = block(x)
    a = active.unsqueeze(1).double()
    assert_close(rows, dense * a, name="rows vs every site")
    assert (dense * (1 - a)).abs().sum() > 0  # the dense MLP did run on the inactive sites


def _compare_to_reference(make, x, active, dtype):
    """make() -> a sparse module; the native kernels in ``dtype`` vs the same module on the reference backend
    (dense F.conv2d / masked torch BN, re-masked) in float64, in train mode: output, dx, every gradient."""
    torch.manual_seed(3)
    ref = make().double().train()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.5 if p.dim() == 1 else 0.0, 0.3)
    mod = make().to(dtype).train()
    mod.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    a = active.unsqueeze(1).to(torch.float64)
    xr = (x.double() * a).detach().requires_grad_()
    xs = (x.to(dtype) * a.to(dtype)).detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with kernels.use_backend("reference"), sparse_context(active):
        yr = ref(xr)
    with sparse_context(active):
        ys = mod(xs)
    atol, rtol = TOLERANCES[dtype]
    assert_close(ys, yr, atol=atol, rtol=rtol, name="output")
    g = torch.randn_like(yr)
    yr.backward(g)
    ys.backward(g.to(dtype))
    assert_close(xs.grad * a, xr.grad * a, atol=atol * 10, rtol=rtol * 10, name="dx at active sites")
    for (n, ps), (_, pr) in zip(mod.named_parameters(), ref.named_parameters()):
        assert_close(ps.grad, pr.grad, atol=atol * 10, rtol=rtol * 10, name=f"grad {n}")
    for (n, bs), (_, br) in zip(mod.named_buffers(), ref.named_buffers()):
        assert_close(bs, br, atol=atol, rtol=rtol, name=f"buffer {n}")
    return ys, yr


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cin,width,stride,H,W,unit", [(12, 5, 1, 14, 10, 2), (8, 6, 2, 13, 9, 3), (16, 4, 1, 6, 6, 1)])
def test_resnet_bottleneck_native_matches_reference(dtype, cin, width, stride, H, W, unit):
    """A ResNet bottleneck (1x1 - 3x3/s - 1x1, masked BN + ReLU after each, downsample shortcut, residual add)
    on the native kernels vs the reference backend, forward and every gradient, train mode."""
    from engine.models.resnet import Bottleneck

    def make():
        block = Bottleneck(cin, width, stride=stride)
        kernels.to_sparse(block)
        return block

    active = _mask(3, -(-H // unit), -(-W // unit), unit)[:, :H, :W]
    ys, _ = _compare_to_reference(make, torch.randn(3, cin, H, W), active, dtype)
    assert ys.abs().sum() > 0


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("onednn", [True, False])
def test_native_linear_matches_float64(monkeypatch, onednn):
    """The GEMM of the native GEMM routes (oneDNN for float32 where torch has it) on strided operands, with
    and without bias, empty row counts; float32 vs the float64 product."""
    from kernels.sparse_conv import sparse_conv2d_native as native

    monkeypatch.setattr(native, "ONEDNN_GEMM", onednn)
    for n, k, m in [(37, 19, 23), (5, 300, 70), (0, 8, 3), (4, 0, 6)]:
        a64, w64, b64 = torch.randn(k, n, dtype=torch.float64).t(), torch.randn(m, k, dtype=torch.float64), None
        for bias in (False, True):
            b64 = torch.randn(m, dtype=torch.float64) if bias else None
            want = a64 @ w64.t() + (b64 if bias else 0)
            got = native.linear(a64.float(), w64.float(), None if b64 is None else b64.float())
            assert got.dtype == torch.float32 and got.shape == (n, m)
            assert_close(got.double(), want, atol=1e-5 * max(k, 1) ** 0.5, rtol=1e-5, name="linear float32")
            assert_close(native.linear(a64, w64, b64), want, name="linear float64")


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("isa", ["auto", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C,Cout,k,stride", [(3, 70, 7, 2), (20, 37, 3, 1), (9, 83, 3, 2), (33, 16, 1, 1)])
def test_native_cpp_kernels_per_isa_match_reference(monkeypatch, isa, dtype, C, Cout, k, stride):
    """The C++ GEMM kernels (forward, dx, dW) in each ISA build the CPU has (AVX-512: 4-strip register
    blocks and their 1-3 strip tails, the stem's patch rows; AVX2) vs the reference, fwd + bwd."""
    from kernels._backend import native
    from kernels.sparse_conv import sparse_conv2d_native

    monkeypatch.setattr(sparse_conv2d_native, "POINTWISE_GEMM", False)
    monkeypatch.setattr(sparse_conv2d_native, "IM2COL_MIN_ROW", 10**9)
    torch.manual_seed(4)
    B, H, W = 2, 19, 13
    active = torch.rand(B, H, W) < 0.5
    x = torch.randn(B, C, H, W, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(Cout, C, k, k, dtype=torch.float64) * 0.3, torch.randn(Cout, dtype=torch.float64)
    g = torch.randn(B, Cout, (H + 2 * (k // 2) - k) // stride + 1, (W + 2 * (k // 2) - k) // stride + 1,
                    dtype=torch.float64)

    def run(t_dtype, backend):
        xs, ws, bs = (t.to(t_dtype).detach().requires_grad_() for t in (x, w, b))
        with kernels.use_backend(backend):
            y, _ = kernels.sparse_conv2d(xs, active, ws, bs, stride, k // 2)
        y.backward(g.to(t_dtype))
        return y, xs.grad, ws.grad, bs.grad

    want = run(torch.float64, "reference")
    used = native().sparse_conv2d_set_isa(isa)
    try:
        got = run(dtype, "native")
    finally:
        native().sparse_conv2d_set_isa("auto")
    assert used in (("avx512", "avx2", "base") if isa == "auto" else ("avx2", "base"))
    atol, rtol = TOLERANCES[dtype]
    scale = k * k * C
    a = active.unsqueeze(1).double()
    for name, gt, wt in zip(("out", "dx", "dW", "db"), got, want):
        if name == "dx":
            gt, wt = gt * a, wt * a
        assert_close(gt, wt, atol=atol * scale, rtol=rtol * 10, name=f"{name} ({used})")


def test_sparse_maxpool_keeps_channels_last_and_matches_masked_max():
    """SparseMaxPool2d (the ResNet stem's pool): max over active inputs only (negative values included), cell
    rule at the output, channels_last in and out; forward and gradient vs a masked -inf reference."""
    from kernels.sparse_conv import downsample_active
    from kernels.sparse_conv.modules import SparseMaxPool2d

    torch.manual_seed(6)
    active = _mask(2, 4, 3, 4)[:, :15, :11]
    x = torch.randn(2, 5, 15, 11, dtype=torch.float64)
    xs = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    pool = SparseMaxPool2d(3, 2, 1)
    with sparse_context(active):
        y = pool(xs)
    assert y.is_contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    want = torch.nn.functional.max_pool2d(xr.masked_fill(~active.unsqueeze(1), float("-inf")), 3, 2, 1)
    a_out = downsample_active(active, 2, y.shape[-2:]).unsqueeze(1) & torch.isfinite(want)
    want = torch.where(a_out, want, torch.zeros((), dtype=want.dtype))
    assert_close(y, want, name="max over active inputs")
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    assert_close(xs.grad, xr.grad, name="grad")


@pytest.mark.parametrize("bias", [True, False])
def test_rows_linear_matches_float64(bias):
    """rows_linear (ConvNeXt's MLP on gathered rows; oneDNN GEMMs on CPU float32): output and the gradients
    of the rows, weight and bias vs nn.Linear in float64; other dtypes / modules fall through to layer(x)."""
    from kernels.sparse_conv.modules import rows_linear

    torch.manual_seed(7)
    layer = torch.nn.Linear(19, 45, bias=bias)
    ref = torch.nn.Linear(19, 45, bias=bias).double()
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x = torch.randn(37, 19, dtype=torch.float64)
    xs, xr = x.float().requires_grad_(), x.clone().requires_grad_()
    y, yr = rows_linear(xs, layer), ref(xr)
    g = torch.randn_like(yr)
    y.backward(g.float())
    yr.backward(g)
    assert_close(y.double(), yr, atol=1e-5, rtol=1e-5, name="output")
    assert_close(xs.grad.double(), xr.grad, atol=1e-5, rtol=1e-5, name="dx")
    assert_close(layer.weight.grad.double(), ref.weight.grad, atol=1e-4, rtol=1e-5, name="dweight")
    if bias:
        assert_close(layer.bias.grad.double(), ref.bias.grad, atol=1e-5, rtol=1e-5, name="dbias")
    assert_close(rows_linear(xr.detach(), ref), ref(xr.detach()), name="float64 falls through")
