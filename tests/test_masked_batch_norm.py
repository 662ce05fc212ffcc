"""masked_batch_norm (SparK's sparse BatchNorm): the Triton kernels vs the float64 reference, forward and all
gradients, NCHW and channels_last, densities 0 / 40% / 100%, odd shapes, garbage at inactive sites, half
precisions, poisoned outputs, the module's running statistics, bad input; the C++ kernels the same way."""

import pytest
import torch
from conftest import assert_close, poison

import kernels
from kernels import masked_batch_norm, use_backend
from kernels.sparse_conv import SparseBatchNorm2d, sparse_context
from kernels.sparse_conv.masked_batch_norm import validate
from kernels.sparse_conv.reference import masked_batch_norm_reference

pytestmark = pytest.mark.interpreter
BACKENDS = ["triton", "native"]  # native: the C++ kernels (CPU only)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts NaN, so unwritten elements fail."""
    monkeypatch.setattr("kernels._buffers.empty", lambda shape, dtype, device: poison(torch.empty(shape, dtype=dtype,
                                                                                                  device=device)))


def _skip_unsupported(backend, device, dtype=torch.float32):
    if backend == "native" and (device.type != "cpu" or dtype not in (torch.float32, torch.float64)):
        pytest.skip("the native masked batch norm runs float32/float64 CPU tensors")


def _case(B, C, H, W, density, dtype, device, fmt=torch.contiguous_format, garbage=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    active = (torch.rand(B, H, W, generator=g) < density).to(device)
    x = (torch.randn(B, C, H, W, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    if not garbage:  # SparK's invariant: zeros at inactive sites; the op must not rely on it
        x = x * active[:, None].to(dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    w = (torch.rand(C, generator=g) + 0.5).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype)
    return x, active, w, b, dy


def _run(fn, x, active, w, b, dy, backend=None):
    inputs = [t for t in (x, w, b) if t is not None]
    if backend is None:
        y, mean, var, n = fn(x, active, w, b)
    else:
        with use_backend(backend, op="masked_batch_norm"):
            y, mean, var, n = fn(x, active, w, b)
    grads = torch.autograd.grad(y, inputs, dy)
    return y, mean, var, n, grads


def _f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("shape", [(3, 37, 13, 11), (2, 3, 28, 5), (1, 64, 1, 9)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_reference(device, poisoned, backend, fmt, density, shape, affine):
    _skip_unsupported(backend, device)
    x, active, w, b, dy = _case(*shape, density, torch.float64, device, fmt)
    if not affine:
        w = b = None
    y, mean, var, n, grads = _run(masked_batch_norm, x, active, w, b, dy, backend)
    yr, mr, vr, nr, grads_r = _run(masked_batch_norm_reference, x, active, w, b, dy)
    assert y.is_contiguous(memory_format=fmt) and y.dtype == x.dtype
    assert_close(y, yr, name="y")
    assert_close(mean, mr, name="mean")
    assert_close(var, vr, name="var")
    assert float(n) == float(nr) == float(active.sum())
    for got, want, name in zip(grads, grads_r, ("dx", "dweight", "dbias")):
        assert_close(got, want, name=name)
    inactive = ~active[:, None].expand_as(y)
    assert torch.all(y[inactive] == 0) and torch.all(grads[0][inactive] == 0)


def test_reference_is_batch_norm_of_the_active_sites(device):
    """The oracle itself: nn.functional.batch_norm on the gathered active sites, scattered back."""
    x, active, w, b, _ = _case(2, 5, 7, 6, 0.5, torch.float64, device)
    y, mean, var, _n = masked_batch_norm_reference(x, active, w, b, 1e-5)
    rows = x.detach().permute(0, 2, 3, 1)[active]  # [n, C]
    want = torch.nn.functional.batch_norm(rows, None, None, w.detach(), b.detach(), True, 0.0, 1e-5)
    assert_close(y.detach().permute(0, 2, 3, 1)[active], want, name="y at active sites")
    assert_close(mean, rows.mean(0), name="mean")
    assert_close(var, rows.var(0, unbiased=False), name="var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_against_float64(device, poisoned, backend, dtype):
    _skip_unsupported(backend, device, dtype)
    x, active, w, b, dy = _case(2, 24, 13, 13, 0.4, dtype, device, torch.channels_last)
    y, mean, _var, _n, grads = _run(masked_batch_norm, x, active, w, b, dy, backend)
    yr, mr, _vr, _nr, grads_r = _run(masked_batch_norm_reference, *_f64(x), active, *_f64(w, b), dy.double())
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_close(y, yr, dtype=dtype, name="y")
    assert_close(mean, mr, dtype=torch.float32, name="mean")
    for got, want, name in zip(grads, grads_r, ("dx", "dweight", "dbias")):
        assert_close(got, want, dtype=dtype, name=name, atol=5e-2 if dtype != torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_grad(device, backend):
    _skip_unsupported(backend, device)
    x, active, w, b, dy = _case(2, 9, 11, 14, 0.5, torch.float64, device)
    xv = x.detach()[:, :, :, 1:13].requires_grad_()  # neither NCHW- nor channels_last-contiguous
    av = active[:, :, 1:13]
    dyv = dy.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, 1:13]
    y, _m, _v, _n, grads = _run(masked_batch_norm, xv, av, w, b, dyv, backend)
    yr, _mr, _vr, _nr, grads_r = _run(masked_batch_norm_reference, xv, av, w, b, dyv)
    assert_close(y, yr, name="y")
    for got, want, name in zip(grads, grads_r, ("dx", "dweight", "dbias")):
        assert_close(got, want, name=name)


def test_module_running_stats_agree_across_backends(device):
    torch.manual_seed(0)
    x, active, *_ = _case(4, 6, 9, 9, 0.5, torch.float64, device, garbage=False)
    names = ["triton", "reference"] + (["native"] if device.type == "cpu" else [])
    mods = {name: SparseBatchNorm2d(6).double().to(device).train() for name in names}
    outs = {}
    for name, mod in mods.items():
        with use_backend(name, op="masked_batch_norm"), sparse_context(active):
            for _ in range(3):
                outs[name] = mod(x)
    for name in names:
        assert_close(outs[name], outs["reference"], name=f"y ({name})")
        for buf in ("running_mean", "running_var"):
            assert_close(getattr(mods[name], buf), getattr(mods["reference"], buf), name=f"{buf} ({name})")
    assert int(mods["triton"].num_batches_tracked) == 3
    rows = x.detach().permute(0, 2, 3, 1)[active]
    m = 0.1
    want_mean = sum(m * (1 - m) ** i for i in range(3)) * rows.mean(0)  # from zeros, 3 EMA steps of the same batch
    assert_close(mods["triton"].running_mean, want_mean, name="running_mean vs closed form")


def test_cpu_dispatch_native_for_fp32_reference_for_half():
    op = kernels.REGISTRY["masked_batch_norm"]
    x, active, w, b, _ = _case(1, 3, 4, 4, 0.5, torch.float32, "cpu")
    assert op.select(validate(x, active, w, b, 1e-5)).backend == "native"
    xh = x.detach().bfloat16()
    assert op.select(validate(xh, active, w.detach().bfloat16(), b.detach().bfloat16(), 1e-5)).backend == "reference"


def test_bad_inputs(device):
    x, active, w, b, _ = _case(2, 4, 5, 6, 0.5, torch.float32, device)
    with pytest.raises(ValueError, match=r"active: expected a bool tensor of shape \(2, 5, 6\)"):
        masked_batch_norm(x, active[:, :4], w, b)
    with pytest.raises(ValueError, match="active"):
        masked_batch_norm(x, active.float(), w, b)
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\)"):
        masked_batch_norm(x, active, w[:3], b)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        masked_batch_norm(x, active, w, torch.zeros(5, device=device))
    with pytest.raises(TypeError, match="x: expected a floating"):
        masked_batch_norm(x.long(), active, w, b)
    with pytest.raises(TypeError, match="x: expected a floating"):
        masked_batch_norm(x[0], active, w, b)
    with pytest.raises(ValueError, match="eps"):
        masked_batch_norm(x, active, w, b, eps=0.0)


def test_torch_compile_traces_the_reference():
    """Under torch.compile the op traces its pure-PyTorch form: same loss and input gradient as eager."""
    torch._dynamo.reset()
    x, active, *_ = _case(2, 5, 6, 6, 0.5, torch.float32, "cpu", garbage=False)
    bn = SparseBatchNorm2d(5).train()

    def loss(inp):
        with sparse_context(active):
            return bn(inp).square().sum()

    compiled = torch.compile(loss, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), [x])
    (g_eager,) = torch.autograd.grad(loss(x), [x])
    assert_close(g_compiled, g_eager, name="dx under compile")
    torch._dynamo.reset()


def test_cpu_paths_run_without_triton():
    """The C++ and reference backends must not import triton (it is only needed for CUDA)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "x = torch.randn(2, 3, 4, 4, requires_grad=True); a = torch.rand(2, 4, 4) < 0.5\n"
        "for be in ('native', 'reference'):\n"
        "    with kernels.use_backend(be, op='masked_batch_norm'):\n"
        "        kernels.masked_batch_norm(x, a, torch.ones(3), torch.zeros(3))[0].sum().backward()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _epilogue_reference(x, active, w, b, residual, relu):
    y, mean, var, n = masked_batch_norm_reference(x, active, w, b, 1e-5)
    y = y if residual is None else y + residual
    return (torch.relu(y) if relu else y), mean, var, n


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("parts", ["relu", "residual", "both"])
@pytest.mark.parametrize("shape", [(3, 37, 13, 11), (2, 5, 7, 3), (1, 16, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_fused_epilogue_matches_float64(device, poisoned, fmt, parts, shape, dtype):
    """y = ReLU(BN(x) + residual) fused on the C++ kernels (one pass forward, one gated pass backward) vs the
    three reference ops in float64: forward, statistics and the gradients of x, weight, bias and residual,
    garbage at inactive sites, a residual that is not zero there, mixed memory formats."""
    _skip_unsupported("native", device, dtype)
    x, active, w, b, dy = _case(*shape, 0.45, dtype, device, fmt)
    relu, with_res = parts in ("relu", "both"), parts in ("residual", "both")
    g = torch.Generator().manual_seed(7)
    res = None
    if with_res:  # the other memory format than x, so both layout paths of the kernels run
        other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
        res = torch.randn(*shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=other)
        res.requires_grad_()
    inputs = [t for t in (x, w, b, res) if t is not None]
    with use_backend("native", op="masked_batch_norm"):
        y, mean, var, n = masked_batch_norm(x, active, w, b, residual=res, relu=relu)
    grads = torch.autograd.grad(y, inputs, dy)
    x64, w64, b64, r64 = _f64(x, w, b, res)
    y64, mean64, var64, n64 = _epilogue_reference(x64, active, w64, b64, r64, relu)
    grads64 = torch.autograd.grad(y64, [t for t in (x64, w64, b64, r64) if t is not None], dy.double())
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    assert_close(y, y64, name="y", **tol)
    assert_close(mean, mean64, name="mean", **tol)
    assert_close(var, var64, name="var", **tol)
    assert float(n) == float(n64)
    a = active[:, None].to(dtype)
    names = ["dx", "dweight", "dbias"] + (["dresidual"] if with_res else [])
    for name, got, want in zip(names, grads, grads64):
        if name == "dx":  # no gradient reaches the (garbage) inactive inputs
            assert (got * (1 - a) == 0).all(), "dx must be exactly zero at inactive sites"
        assert_close(got, want, name=name, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    if relu:
        assert (y >= 0).all() and (y == 0).any()


def test_native_fused_epilogue_skips_unneeded_grads_and_checks_residual(device):
    _skip_unsupported("native", device)
    x, active, w, b, dy = _case(2, 6, 5, 4, 0.5, torch.float64, device, torch.channels_last)
    res = torch.randn(2, 6, 5, 4, dtype=torch.float64, device=device)  # no grad wanted
    with use_backend("native", op="masked_batch_norm"):
        y, *_ = masked_batch_norm(x.detach(), active, w, b, residual=res, relu=True)
        (dw,) = torch.autograd.grad(y, [w], dy)
        with pytest.raises(ValueError, match="residual: expected a tensor like x"):
            masked_batch_norm(x, active, w, b, residual=res[:, :3])
        with pytest.raises(ValueError, match="residual: expected a tensor like x"):
            masked_batch_norm(x, active, w, b, residual=res.float())
    x64, w64, b64 = _f64(x.detach(), w, b)
    y64, *_ = _epilogue_reference(x64, active, w64, b64, res, True)
    (dw64,) = torch.autograd.grad(y64, [w64], dy)
    assert_close(y, y64, name="y")
    assert_close(dw, dw64, name="dweight")


@pytest.mark.parametrize("relu", [True, False])
def test_module_forward_relu_matches_composition(device, relu):
    """SparseBatchNorm2d.forward_relu (the ResNet epilogue) == ReLU(bn(x) + r), running statistics included,
    on the native kernels and on the reference, in and out of a sparse_context."""
    torch.manual_seed(5)
    x = torch.randn(2, 7, 6, 5, dtype=torch.float64, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    active = torch.rand(2, 6, 5, device=device) < 0.5
    x = x * active[:, None]
    r = torch.randn_like(x) * active[:, None]
    fused, plain = SparseBatchNorm2d(7).double().to(device), SparseBatchNorm2d(7).double().to(device)
    for ctx in (True, False):
        with sparse_context(active) if ctx else torch.enable_grad():
            y1 = fused.forward_relu(x, r, relu=relu)
            y2 = plain(x) + r
            y2 = torch.relu(y2) if relu else y2
        assert_close(y1, y2, name=f"forward_relu (context={ctx})")
        assert_close(fused.running_mean, plain.running_mean, name="running_mean")
        assert_close(fused.running_var, plain.running_var, name="running_var")


@pytest.mark.parametrize("isa", ["auto", "avx2", "base"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_row_kernels_per_isa(device, poisoned, isa, dtype):
    """The channels_last row kernels in each ISA build (AVX-512 / AVX2 / baseline): plain and fused paths,
    channel counts off the vector widths, vs the float64 reference."""
    _skip_unsupported("native", device, dtype)
    from kernels._backend import native

    used = native().masked_bn_set_isa(isa)
    try:
        for shape, relu in (((2, 37, 6, 5), False), ((3, 19, 4, 7), True), ((1, 130, 3, 3), True)):
            x, active, w, b, dy = _case(*shape, 0.5, dtype, device, torch.channels_last)
            res = (torch.randn(*shape, dtype=dtype, device=device) * active[:, None]).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            with use_backend("native", op="masked_batch_norm"):
                y, *_ = masked_batch_norm(x, active, w, b, residual=res if relu else None, relu=relu)
            grads = torch.autograd.grad(y, [x, w, b] + ([res] if relu else []), dy)
            x64, w64, b64, r64 = _f64(x, w, b, res)
            y64, *_ = _epilogue_reference(x64, active, w64, b64, r64 if relu else None, relu)
            grads64 = torch.autograd.grad(y64, [x64, w64, b64] + ([r64] if relu else []), dy.double())
            tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
            assert_close(y, y64, name=f"y ({used})", **tol)
            for i, (got, want) in enumerate(zip(grads, grads64)):
                assert_close(got, want, name=f"grad {i} ({used})", atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    finally:
        native().masked_bn_set_isa("auto")
