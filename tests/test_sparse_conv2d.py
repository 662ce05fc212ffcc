"""Sparse (submanifold / SparK) convolution: C++ and Triton backends vs the dense oracle, modules, to_sparse."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, poison
from torch import nn

from kernels import NotSupportedError, sparse_conv2d, use_backend
from kernels._backend import native_reasons
from kernels.sparse_conv import (
    SparseAdaptiveAvgPool2d,
    SparseAvgPool2d,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLayerNorm,
    SparseMaxPool2d,
    downsample_active,
    sparse_context,
    to_sparse,
    upsample_active,
)
from kernels.sparse_conv.sparse_conv2d import OP as sparse_conv_op
from kernels.sparse_conv.sparse_conv2d import SparseConv2dInputs
from kernels.sparse_conv.active import unit_structure, unit_tiling
from kernels.sparse_conv.reference import sparse_conv2d_reference

needs_native = pytest.mark.skipif(bool(native_reasons()), reason="kernels._C is not built")


pytestmark = pytest.mark.usefixtures("poison_outputs")  # tests/conftest.py


def _inputs(B, C, Cout, H, W, k, groups, density, dtype, *, noncontig=False, garbage=True):
    if noncontig:  # channels-last storage seen through NCHW, a strided weight and a transposed map
        x = torch.randn(B, H, W, C, dtype=dtype).permute(0, 3, 1, 2)
        w = torch.randn(k, k, C // groups, Cout, dtype=dtype).permute(3, 2, 0, 1)
        active = torch.rand(B, W, H).transpose(1, 2) < density
    else:
        x = torch.randn(B, C, H, W, dtype=dtype)
        w = torch.randn(Cout, C // groups, k, k, dtype=dtype)
        active = torch.rand(B, H, W) < density
    if not garbage:
        x = x * active.unsqueeze(1)
    b = torch.randn(Cout, dtype=dtype)
    return x, active, w, b


def _check_against_reference(x, active, w, b, stride, padding, groups, dtype, backend, atol=None, rtol=None):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with use_backend(backend, op="sparse_conv2d"):
        out, a_out = sparse_conv2d(xs, active, ws, bs, stride=stride, padding=padding, groups=groups)
    ref = sparse_conv2d_reference(x64, active, a_out, w64, b64, stride, padding, 1, groups)
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype, atol=atol, rtol=rtol, name="out")
    inactive = ~a_out.unsqueeze(1).expand_as(out)
    assert (out.detach()[inactive] == 0).all(), "inactive output sites must be exactly zero"
    g = torch.randn(ref.shape, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(out, (xs, ws, bs), g.to(dtype))
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64), g)
    assert_close(gx, rx, dtype=dtype, atol=atol, rtol=rtol, name="dx")
    assert (gx[~active.unsqueeze(1).expand_as(gx)] == 0).all(), "dx must be zero at inactive input sites"
    assert_close(gw, rw, dtype=dtype, atol=atol, rtol=rtol, name="dweight")
    assert_close(gb, rb, dtype=dtype, atol=atol, rtol=rtol, name="dbias")
    return a_out


# ----------------------------------------------------------------------------------------------------------
# native C++ backend


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (7, 1), (1, 2), (3, 2), (7, 2)])
@pytest.mark.parametrize("C,depthwise", [(3, False), (24, False), (24, True)])
@pytest.mark.parametrize("H,W", [(13, 28), (28, 13)])
def test_native_float64_matches_reference(H, W, C, depthwise, k, stride, density):
    groups, Cout = (C, C) if depthwise else (1, 24 if C == 3 else 17)
    x, active, w, b = _inputs(2, C, Cout, H, W, k, groups, density, torch.float64, noncontig=(H == 28))
    inputs = SparseConv2dInputs(x, active, active, w, b, (1, 1), (0, 0), (1, 1), groups)
    assert sparse_conv_op.select(inputs).backend == "native"
    a_out = _check_against_reference(x, active, w, b, stride, k // 2, groups, torch.float64, "native")
    assert torch.equal(a_out, downsample_active(active, stride, a_out.shape[1:]))


@needs_native
@pytest.mark.native
@pytest.mark.parametrize(
    "C,Cout,groups,k,stride", [(24, 40, 1, 3, 1), (3, 64, 1, 7, 2), (40, 40, 40, 7, 1), (33, 20, 1, 1, 2)]
)
def test_native_float32(C, Cout, groups, k, stride):
    x, active, w, b = _inputs(2, C, Cout, 15, 11, k, groups, 0.4, torch.float32)
    # |out| sums up to k*k*C products: scale the absolute tolerance with the reduction length
    _check_against_reference(
        x, active, w, b, stride, k // 2, groups, torch.float32, "native", atol=2e-6 * k * k * C, rtol=1e-4
    )


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("C,Cout,k,stride", [(72, 21, 3, 1), (1030, 9, 1, 1), (130, 6, 3, 2)])
def test_native_weight_grad_over_many_site_chunks(C, Cout, k, stride):
    """dW accumulates over several chunks of sites (long im2col rows give short chunks); odd channel counts
    leave padded rows and a tail block of output channels."""
    x, active, w, b = _inputs(2, C, Cout, 17, 19, k, 1, 0.6, torch.float64, noncontig=True)
    _check_against_reference(x, active, w, b, stride, k // 2, 1, torch.float64, "native")


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("route", ["cpp", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "C,Cout,k,stride,density", [(7, 19, 1, 1, 0.4), (9, 5, 1, 2, 0.5), (6, 11, 3, 1, 0.4), (5, 9, 3, 2, 1.0),
                                (4, 6, 5, 2, 0.0), (3, 8, 7, 2, 0.6)]
)
def test_native_routes_match_reference(monkeypatch, route, dtype, C, Cout, k, stride, density):
    """Both native routes: the C++ kernels, and torch GEMMs on gathered rows / im2col rows (1x1 and wide
    kernels); odd sizes, non-contiguous inputs, empty and full maps."""
    from kernels.sparse_conv import sparse_conv2d_native as native

    monkeypatch.setattr(native, "POINTWISE_GEMM", route == "gemm")
    monkeypatch.setattr(native, "IM2COL_MIN_ROW", 0 if route == "gemm" else 10**9)
    x, active, w, b = _inputs(2, C, Cout, 13, 10, k, 1, density, dtype, noncontig=stride == 2)
    tol = {} if dtype == torch.float64 else {"atol": 2e-6 * k * k * C, "rtol": 1e-4}
    _check_against_reference(x, active, w, b, stride, k // 2, 1, dtype, "native", **tol)
    if k == 1:  # a 1x1 kernel with padding is not a row GEMM: the C++ kernels take it
        _check_against_reference(x, active, w, b, stride, 1, 1, dtype, "native", **tol)


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("route", ["cpp", "gemm"])
def test_native_dilation_padding_and_explicit_active_out(monkeypatch, route):
    from kernels.sparse_conv import sparse_conv2d_native as native

    monkeypatch.setattr(native, "POINTWISE_GEMM", route == "gemm")
    monkeypatch.setattr(native, "IM2COL_MIN_ROW", 0 if route == "gemm" else 10**9)
    x, active, w, b = _inputs(2, 5, 9, 12, 10, 3, 1, 0.5, torch.float64)
    a_out = torch.rand(2, 12, 10) < 0.7
    out, got = sparse_conv2d(x, active, w, b, stride=1, padding=2, dilation=2, active_out=a_out)
    assert got is a_out
    assert_close(out, sparse_conv2d_reference(x, active, a_out, w, b, 1, 2, 2, 1), name="dilated")
    out, a2 = sparse_conv2d(x, active, w, None, stride=(2, 1), padding=(0, 1))
    assert_close(
        out, sparse_conv2d_reference(x, active, a2, w, None, (2, 1), (0, 1), 1, 1), name="asymmetric"
    )


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("depthwise", [False, True])
def test_native_launchers_write_every_element(depthwise):
    from kernels.sparse_conv import sparse_conv2d_native as native

    C, Cout = (6, 6) if depthwise else (5, 19)
    x, active, w, b = _inputs(2, C, Cout, 9, 7, 3, C if depthwise else 1, 0.5, torch.float64)
    a_out = downsample_active(active, 2, (5, 4))
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    out = poison(torch.empty(2, 5, 4, Cout, dtype=torch.float64))
    native.forward(x_nhwc, active, a_out, w, b, (2, 2), (1, 1), (1, 1), depthwise, out=out)
    ref = sparse_conv2d_reference(x, active, a_out, w, b, 2, 1, 1, C if depthwise else 1)
    assert_close(out.permute(0, 3, 1, 2), ref, name="out")
    g = torch.randn(2, 5, 4, Cout, dtype=torch.float64)
    dx = poison(torch.empty(2, 9, 7, C, dtype=torch.float64))
    native.backward_input(g, active, a_out, w, (2, 2), (1, 1), (1, 1), depthwise, out=dx)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = sparse_conv2d_reference(xr, active, a_out, wr, br, 2, 1, 1, C if depthwise else 1)
    rx, rw, rb = torch.autograd.grad(ref, (xr, wr, br), g.permute(0, 3, 1, 2))
    assert_close(dx.permute(0, 3, 1, 2), rx, name="dx")
    shape = (9, Cout) if depthwise else (Cout, native.padded(9 * C, torch.float64))
    dw_buf, db_buf = (
        poison(torch.empty(shape, dtype=torch.float64)),
        poison(torch.empty(Cout, dtype=torch.float64)),
    )
    dw, db = native.backward_weight(
        x_nhwc,
        g,
        active,
        a_out,
        tuple(w.shape),
        (2, 2),
        (1, 1),
        (1, 1),
        depthwise,
        out=dw_buf,
        out_bias=db_buf,
    )
    assert_close(dw, rw, name="dweight")
    assert_close(db, rb, name="dbias")
    assert torch.isfinite(dw_buf).all(), "the packed weight-gradient buffer must be fully written"


@needs_native
@pytest.mark.native
def test_native_is_deterministic_and_ignores_inactive_values():
    x, active, w, b = _inputs(2, 16, 32, 14, 14, 3, 1, 0.4, torch.float32)
    out1, _ = sparse_conv2d(x, active, w, b, padding=1)
    out2, _ = sparse_conv2d(x * active.unsqueeze(1), active, w, b, padding=1)
    assert torch.equal(out1, out2)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    grads = []
    for _ in range(2):
        out, _ = sparse_conv2d(xr, active, wr, b, padding=1)
        grads.append(torch.autograd.grad(out.square().sum(), (xr, wr)))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


@needs_native
@pytest.mark.native
@pytest.mark.parametrize("C,Cout,groups,k,stride", [(24, 17, 1, 3, 2), (3, 20, 1, 7, 2), (12, 12, 12, 7, 1)])
def test_native_baseline_isa(C, Cout, groups, k, stride):
    from kernels._backend import native

    x, active, w, b = _inputs(2, C, Cout, 13, 12, k, groups, 0.6, torch.float64)
    assert native().sparse_conv2d_set_isa("base") == "base"
    try:
        _check_against_reference(x, active, w, b, stride, k // 2, groups, torch.float64, "native")
    finally:
        native().sparse_conv2d_set_isa("auto")


# ----------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU; tiny shapes)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "C,Cout,groups,k,stride,density",
    [
        (3, 5, 1, 3, 1, 0.4),
        (6, 6, 6, 7, 1, 0.4),
        (5, 3, 1, 1, 2, 1.0),
        (6, 6, 6, 3, 2, 1.0),
        (3, 4, 1, 3, 2, 0.0),
        (3, 4, 1, 7, 2, 0.4),
    ],
)
def test_triton_matches_reference(C, Cout, groups, k, stride, density, dtype, device):
    x, active, w, b = _inputs(2, C, Cout, 7, 6, k, groups, density, dtype, noncontig=(k == 3))
    x, active, w, b = (t.to(device) for t in (x, active, w, b))
    assert (
        sparse_conv_op.not_supported_reasons("triton", SparseConv2dInputs(x, active, active, w, b, (1, 1), (0, 0),
                                                                          (1, 1), 1))
        != []
        or device.type == "cuda"
    )
    _check_against_reference(
        x,
        active,
        w,
        b,
        stride,
        k // 2,
        groups,
        dtype,
        "triton",
        atol=None if dtype == torch.float64 else 1e-5 * k * k * C,
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("depthwise", [False, True])
def test_triton_launchers_write_every_active_element(depthwise, device):
    from kernels.sparse_conv import sparse_conv2d_triton as tk

    C, Cout = (4, 4) if depthwise else (3, 5)
    groups = C if depthwise else 1
    x, active, w, b = (t.to(device) for t in _inputs(1, C, Cout, 6, 5, 3, groups, 0.5, torch.float64))
    a_out = downsample_active(active, 1, (6, 5))
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    out = poison(torch.empty(1, 6, 5, Cout, dtype=torch.float64, device=device))
    tk.forward(x_nhwc, active, a_out, w, b, (1, 1), (1, 1), (1, 1), depthwise, out=out)
    assert_close(
        out.permute(0, 3, 1, 2), sparse_conv2d_reference(x, active, a_out, w, b, 1, 1, 1, groups), name="out"
    )
    g = torch.randn(1, 6, 5, Cout, dtype=torch.float64, device=device)
    dx = poison(torch.empty(1, 6, 5, C, dtype=torch.float64, device=device))
    tk.backward_input(g, active, a_out, w, (1, 1), (1, 1), (1, 1), depthwise, out=dx)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = sparse_conv2d_reference(xr, active, a_out, wr, br, 1, 1, 1, groups)
    rx, rw, rb = torch.autograd.grad(ref, (xr, wr, br), g.permute(0, 3, 1, 2))
    assert_close(dx.permute(0, 3, 1, 2), rx, name="dx")
    dw_buf = poison(torch.empty(w.shape, dtype=torch.float64, device=device))
    db_buf = poison(torch.empty(Cout, dtype=torch.float64, device=device))
    dw, db = tk.backward_weight(
        x_nhwc,
        g,
        active,
        a_out,
        tuple(w.shape),
        (1, 1),
        (1, 1),
        (1, 1),
        depthwise,
        out=dw_buf,
        out_bias=db_buf,
    )
    assert_close(dw, rw, name="dweight")
    assert_close(db, rb, name="dbias")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 4])
def test_triton_low_precision(dtype, groups, device):
    x, active, w, b = (
        t.to(device) for t in _inputs(2, 4, 4 if groups > 1 else 6, 6, 5, 3, groups, 0.6, torch.float32)
    )
    x, w, b = (t.to(dtype).requires_grad_() for t in (x, w, b))
    with use_backend("triton", op="sparse_conv2d"):
        out, a_out = sparse_conv2d(x, active, w, b, padding=1, groups=groups)
        grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = sparse_conv2d_reference(x64, active, a_out, w64, b64, 1, 1, 1, groups)
    refs = torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref))
    tol = {"atol": 0.1, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-2, "rtol": 2e-3}
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, ref, dtype=dtype, name="out", **tol)
    for g, r, name in zip(grads, refs, ("dx", "dweight", "dbias")):
        assert_close(g, r, dtype=dtype, name=name, **tol)


# ----------------------------------------------------------------------------------------------------------
# Triton, tiled over whole mask units (maps built from a coarse unit mask: kernels/sparse_conv2d_units_triton.py)


def _unit_case(B, C, Cout, grid_hw, unit, k, groups, dtype, device, *, noncontig=False, density=0.5):
    """x on a map upsampled from a coarse [B, Hc, Wc] unit mask (so marked with its units); garbage at inactive
    sites (the op treats them as zeros, the kernels must not read them)."""
    Hc, Wc = grid_hw
    coarse = (torch.rand(B, Hc, Wc) < density).to(device)
    coarse[0, 0, 0] = True  # never empty
    if B > 1:
        coarse[-1, -1, -1] = False  # never full
    active = upsample_active(coarse, unit)
    x, _, w, b = _inputs(B, C, Cout, Hc * unit, Wc * unit, k, groups, 1.0, dtype, noncontig=noncontig)
    return x.to(device), active, w.to(device), b.to(device)


def _forbid_site_path(monkeypatch, dx_too=True):
    from kernels.sparse_conv import sparse_conv2d_triton as tk

    def boom(*a, **k):
        raise AssertionError("the site-list kernels ran where the unit kernels should")

    monkeypatch.setattr(tk, "forward", boom)
    monkeypatch.setattr(tk, "backward_weight", boom)
    if dx_too:
        monkeypatch.setattr(tk, "backward_input", boom)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "B,C,Cout,grid_hw,unit,k,stride,depthwise",
    [
        (3, 5, 7, (3, 2), 1, 3, 1, False),  # 1-site units: many units per tile
        (1, 20, 37, (2, 3), 2, 3, 1, False),  # channels over one block, with tails
        (3, 6, 5, (2, 2), 4, 1, 1, False),
        (1, 7, 9, (3, 2), 3, 3, 1, False),  # 9-site units (not a power of 2)
        (1, 5, 6, (2, 1), 8, 3, 1, False),  # 64-site units: several tiles per unit
        (1, 5, 6, (3, 2), 4, 3, 2, False),  # stride 2: dx by parity class
        (3, 4, 9, (2, 2), 2, 1, 2, False),  # 1x1 stride 2: three of the four classes have no tap
        (1, 3, 8, (2, 2), 4, 7, 2, False),  # the 7x7 stride-2 stem
        (1, 6, 6, (3, 3), 1, 7, 1, True),  # 7x7 depthwise on 1-site units: 3 units of reach
        (3, 5, 5, (2, 2), 2, 7, 1, True),
        (1, 6, 6, (2, 3), 4, 3, 2, True),
    ],
)
def test_triton_unit_path_matches_reference(monkeypatch, B, C, Cout, grid_hw, unit, k, stride, depthwise, dtype,
                                            device):
    groups = C if depthwise else 1
    x, active, w, b = _unit_case(B, C, Cout, grid_hw, unit, k, groups, dtype, device, noncontig=(k == 3))
    a_out = downsample_active(active, stride)
    inputs = SparseConv2dInputs(x, active, a_out, w, b, (stride,) * 2, (k // 2,) * 2, (1, 1), groups)
    assert inputs.triton_path.startswith("units: tiled over"), inputs.triton_path
    _forbid_site_path(monkeypatch)
    _check_against_reference(x, active, w, b, stride, k // 2, groups, dtype, "triton",
                             atol=None if dtype == torch.float64 else 1e-5 * k * k * C)


@pytest.mark.interpreter
@pytest.mark.parametrize("depthwise", [False, True])
def test_triton_unit_launchers_write_every_element(depthwise, device):
    """Poisoned output buffers (and the fixture's poisoned partials): inactive units come back exactly 0."""
    from kernels.sparse_conv import sparse_conv2d_units_triton as tu

    C, Cout = (5, 5) if depthwise else (3, 7)
    groups = C if depthwise else 1
    x, active, w, b = _unit_case(3, C, Cout, (3, 2), 2, 3, groups, torch.float64, device)
    a_out = downsample_active(active, 2)
    plan, why = SparseConv2dInputs(x, active, a_out, w, b, (2, 2), (1, 1), (1, 1), groups).units
    assert plan is not None and plan.dx, why
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    out = poison(torch.empty(3, 3, 2, Cout, dtype=torch.float64, device=device))
    tu.forward(x_nhwc, active, a_out, w, b, (2, 2), (1, 1), (1, 1), depthwise, plan, out=out)
    ref = sparse_conv2d_reference(x, active, a_out, w, b, 2, 1, 1, groups)
    assert_close(out.permute(0, 3, 1, 2), ref, name="out")
    assert (out[~a_out] == 0).all()
    g = torch.randn(3, 3, 2, Cout, dtype=torch.float64, device=device)
    dx = poison(torch.empty(3, 6, 4, C, dtype=torch.float64, device=device))
    tu.backward_input(g, active, a_out, w, (2, 2), (1, 1), (1, 1), depthwise, plan, out=dx)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = sparse_conv2d_reference(xr, active, a_out, wr, br, 2, 1, 1, groups)
    rx, rw, rb = torch.autograd.grad(ref, (xr, wr, br), g.permute(0, 3, 1, 2))
    assert_close(dx.permute(0, 3, 1, 2), rx, name="dx")
    assert (dx[~active] == 0).all()
    dw_buf = poison(torch.empty(w.shape, dtype=torch.float64, device=device))
    db_buf = poison(torch.empty(Cout, dtype=torch.float64, device=device))
    dw, db = tu.backward_weight(x_nhwc, g, active, a_out, tuple(w.shape), (2, 2), (1, 1), (1, 1), depthwise, plan,
                                out=dw_buf, out_bias=db_buf)
    assert_close(dw, rw, name="dweight")
    assert_close(db, rb, name="dbias")


@pytest.mark.interpreter
def test_triton_unit_path_low_precision(monkeypatch, device):
    x, active, w, b = _unit_case(2, 6, 10, (2, 2), 2, 3, 1, torch.float32, device)
    x, w, b = (t.to(torch.bfloat16).requires_grad_() for t in (x, w, b))
    _forbid_site_path(monkeypatch)
    with use_backend("triton", op="sparse_conv2d"):
        out, a_out = sparse_conv2d(x, active, w, b, padding=1)
        grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = sparse_conv2d_reference(x64, active, a_out, w64, b64, 1, 1, 1, 1)
    refs = torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref))
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, dtype=torch.bfloat16, atol=0.1, rtol=2e-2, name="out")
    for g, r, name in zip(grads, refs, ("dx", "dweight", "dbias")):
        assert_close(g, r, dtype=torch.bfloat16, atol=0.1, rtol=2e-2, name=name)


def test_unit_marks_and_dispatch_reasons():
    coarse = torch.rand(2, 3, 4) < 0.5
    fine = upsample_active(coarse, 4)

    grid, unit = unit_structure(fine)
    assert unit == (4, 4) and unit_structure(coarse) == (grid, (1, 1))
    half = downsample_active(fine, 2)
    assert unit_structure(half) == (grid, (2, 2))
    assert unit_structure(downsample_active(fine, 8)) is None  # a stride beyond the unit: cells of several units
    order, count, bits = grid.index()
    assert grid.index()[0] is order  # built once, shared
    assert int(count) == int(coarse.sum())
    assert torch.equal(coarse.reshape(-1)[order.long()], torch.arange(24) < int(count))
    u = int(order[0])
    b_, cy, cx = u // 12, (u // 4) % 3, u % 4
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            y, xx = cy + dy, cx + dx
            want = 0 <= y < 3 and 0 <= xx < 4 and bool(coarse[b_, y, xx])
            assert bool((int(bits[0]) >> ((dy + 3) * 7 + dx + 3)) & 1) == want
    assert unit_tiling(fine, half, (3, 3), (2, 2), (1, 1), (1, 1))[0].dx
    assert unit_tiling(fine, fine, (3, 3), (1, 1), (1, 1), (1, 1))[0].unit_in == (4, 4)
    plan, why = unit_tiling(fine, half, (3, 3), (2, 2), (2, 2), (2, 2))
    assert plan is not None and not plan.dx and "dilated" in plan.dx_reason
    assert "not marked" in unit_tiling(torch.rand(2, 12, 16) < 0.5, half, (3, 3), (2, 2), (1, 1), (1, 1))[1]
    assert "stride" in unit_tiling(fine, fine, (3, 3), (2, 2), (1, 1), (1, 1))[1]
    assert "reach" in unit_tiling(coarse, coarse, (9, 9), (1, 1), (4, 4), (1, 1))[1]
    other = upsample_active(coarse.clone(), 4)
    assert "different unit masks" in unit_tiling(fine, other, (1, 1), (1, 1), (0, 0), (1, 1))[1]
    edited = upsample_active(coarse, 2)
    edited[0, 0, 0] = ~edited[0, 0, 0]  # in place: no longer known to be unit-structured
    assert unit_structure(edited) is None
    x = torch.randn(2, 3, 12, 16)
    w = torch.randn(4, 3, 3, 3)
    assert SparseConv2dInputs(x, fine, fine, w, None, (1, 1), (1, 1), (1, 1), 1).triton_path.startswith("units")
    arbitrary = torch.rand(2, 12, 16) < 0.5
    assert SparseConv2dInputs(x, arbitrary, arbitrary, w, None, (1, 1), (1, 1), (1, 1), 1).triton_path.startswith(
        "sites: ")


@pytest.mark.interpreter
def test_triton_unit_path_through_sparse_context(monkeypatch, device):
    """A SparseConv2d chain inside sparse_context(coarse unit mask): every layer (stride 2 included) takes the
    unit kernels, one unit index for the whole step, and matches the dense reference."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.Conv2d(6, 6, 3, 1, 1, groups=6), nn.Conv2d(6, 5, 1)).double()
    layers = [SparseConv2d.from_dense(m) for m in net]
    coarse = torch.rand(2, 2, 3) < 0.6
    coarse[0, 0, 0] = True
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, requires_grad=True).to(device)
    _forbid_site_path(monkeypatch)
    with use_backend("triton", op="sparse_conv2d"), sparse_context(coarse.to(device)) as maps:
        y = x
        for m in layers:
            y = m(y)
        grids = {id(unit_structure(maps.get(size))[0]) for size in ((8, 12), (4, 6), (2, 3))}
    assert len(grids) == 1, "every scale shares one unit grid (one unit index per step)"
    gx, *gws = torch.autograd.grad(y.sum(), [x] + [m.weight for m in layers])
    a = upsample_active(coarse.to(device), 4)
    a2 = downsample_active(a, 2)
    ref = sparse_conv2d_reference(x, a, a2, net[0].weight, net[0].bias, 2, 1, 1, 1)
    ref = sparse_conv2d_reference(ref, a2, a2, net[1].weight, net[1].bias, 1, 1, 1, 6)
    ref = sparse_conv2d_reference(ref, a2, a2, net[2].weight, net[2].bias, 1, 0, 1, 1)
    assert_close(y, ref, name="out")
    rx, *rws = torch.autograd.grad(ref.sum(), [x] + [m.weight for m in net])
    assert_close(gx, rx, name="dx")
    for g, r in zip(gws, rws):
        assert_close(g, r, name="dweight")


@pytest.mark.slow
@pytest.mark.interpreter
def test_triton_kernels_compile_for_sm90():
    """The kernels lower through the real NVIDIA backend as the JIT builds them (bf16, Hopper) at ResNet-50
    stage 1 and a ConvNeXt 7x7 depthwise layer (B 32, 224 px; stride/padding/dilation 1 folded to constants):
    no spills, the implicit-GEMM dots of the data-dependent tap branch on wgmma, the weight-gradient dots on
    mma.sync (32-row tiles); the unit-tiled kernels (8x8-site units: forward and weight gradient on wgmma); and
    the masked batch-norm kernels. Every layer, dtype and sm_80:
    ``python -m bench.static_gpu_check --ops sparse_conv,masked_bn``."""
    from _aot import run_static

    results = run_static("sparse_conv,masked_bn")
    assert len(results) == 11  # 5 site-list + 4 unit-tiled sparse conv kernels, 2 masked batch norm
    for r in results:
        assert r["spill_stores"] == 0, (r["kernel"], r["case"])
        assert r["found"] == r["expect"], (r["kernel"], r["case"], r["found"], r["expect"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_cuda(dtype, device):
    x, active, w, b = (t.to(device) for t in _inputs(4, 64, 96, 28, 28, 3, 1, 0.4, torch.float32))
    ref = sparse_conv2d_reference(x.double(), active, active, w.double(), b.double(), 1, 1, 1, 1)
    with use_backend("triton", op="sparse_conv2d"):
        out, _ = sparse_conv2d(x.to(dtype), active, w.to(dtype), b.to(dtype), padding=1)
    assert_close(out, ref, dtype=dtype, atol=0.3, rtol=5e-2, name="out")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "C,Cout,unit,k,stride,depthwise",
    [(64, 96, 8, 3, 1, False), (72, 128, 8, 3, 2, False), (64, 40, 4, 1, 2, False), (96, 96, 8, 7, 1, True),
     (256, 512, 1, 3, 1, False), (3, 64, 32, 7, 2, False)],
)
def test_triton_unit_path_cuda(monkeypatch, C, Cout, unit, k, stride, depthwise, device):
    """The compiled unit kernels (SparK maps) at layer-like shapes, bf16 vs float64: forward, dx (parity
    classes), dW, dbias; the 512-channel 1-site-unit case runs the forward / dx split-K."""
    groups = C if depthwise else 1
    x, active, w, b = _unit_case(4, C, Cout, (7, 7), unit, k, groups, torch.float32, device)
    w = w / (k * (C // groups) ** 0.5)
    _forbid_site_path(monkeypatch)
    xs, ws, bs = (t.detach().to(torch.bfloat16).requires_grad_() for t in (x, w, b))
    with use_backend("triton", op="sparse_conv2d"):
        out, a_out = sparse_conv2d(xs, active, ws, bs, stride=stride, padding=k // 2, groups=groups)
    g = torch.randn(out.shape, device=device) * a_out.unsqueeze(1)
    grads = torch.autograd.grad(out, (xs, ws, bs), g.to(torch.bfloat16))
    r = [t.detach().double().requires_grad_() for t in (xs, ws, bs)]
    ref = sparse_conv2d_reference(r[0], active, a_out, r[1], r[2], stride, k // 2, 1, groups)
    refs = torch.autograd.grad(ref, r, g.double())
    assert (out[~a_out.unsqueeze(1).expand_as(out)] == 0).all()
    for got, want, name in zip((out, *grads), (ref, *refs), ("out", "dx", "dweight", "dbias")):
        scale = want.abs().max().item() or 1.0
        assert_close(got, want, dtype=torch.bfloat16, atol=2e-2 * scale, rtol=3e-2, name=name)


# ----------------------------------------------------------------------------------------------------------
# activity maps, dispatch, errors


def test_downsample_active_rule():
    a = torch.zeros(1, 5, 6, dtype=torch.bool)
    a[0, 4, 0] = True  # bottom-left site of an odd-height map
    d = downsample_active(a, 2)
    assert d.shape == (1, 3, 3) and d[0, 2, 0] and d.sum() == 1
    assert downsample_active(a, 1) is a
    units = torch.rand(3, 7, 7) < 0.4
    fine = upsample_active(units, 32)  # SparK: 32-px units -> any == all at every stride <= 32
    for s in (2, 4, 8, 16, 32):
        d = downsample_active(fine, s)
        assert torch.equal(d, upsample_active(units, 32 // s))
        assert torch.equal(d, ~downsample_active(~fine, s))  # any == all
    assert torch.equal(downsample_active(downsample_active(a, 2), 2), downsample_active(a, 4))


def test_reference_fallback_for_bfloat16_on_cpu():
    x, active, w, b = _inputs(1, 4, 6, 9, 9, 3, 1, 0.5, torch.bfloat16)
    out, a_out = sparse_conv2d(x, active, w, b, padding=1)
    assert out.dtype == torch.bfloat16
    ref = sparse_conv2d_reference(x.double(), active, a_out, w.double(), b.double(), 1, 1, 1, 1)
    assert_close(out, ref, dtype=torch.bfloat16, atol=0.15, rtol=2e-2)
    with use_backend("native", op="sparse_conv2d"), pytest.raises(NotSupportedError, match="float32/float64"):
        sparse_conv2d(x, active, w, b, padding=1)


def test_bad_inputs_raise_clear_errors():
    x, active, w, b = _inputs(2, 4, 6, 9, 9, 3, 1, 0.5, torch.float32)
    with pytest.raises(ValueError, match=r"active: expected shape \(2, 9, 9\)"):
        sparse_conv2d(x, active[:, :8], w, b)
    with pytest.raises(TypeError, match="active: expected dtype bool"):
        sparse_conv2d(x, active.float(), w, b)
    with pytest.raises(ValueError, match="weight: expected shape"):
        sparse_conv2d(x, active, torch.randn(6, 5, 3, 3), b)
    with pytest.raises(ValueError, match="groups: sparse_conv2d supports groups=1 or depthwise"):
        sparse_conv2d(x, active, torch.randn(6, 2, 3, 3), b, groups=2)
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\)"):
        sparse_conv2d(x, active, w, torch.randn(5))
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        sparse_conv2d(x, active, w.double(), b)
    with pytest.raises(ValueError, match="x: expected 4-D tensor"):
        sparse_conv2d(x[0], active, w, b)
    with pytest.raises(ValueError, match="active_out: expected shape"):
        sparse_conv2d(x, active, w, b, padding=1, active_out=active[:, :5])
    with pytest.raises(ValueError, match="too small"):
        sparse_conv2d(x[:, :, :2, :2], active[:, :2, :2], w, b)
    with pytest.raises(TypeError, match="stride"):
        sparse_conv2d(x, active, w, b, stride=1.5)
    with pytest.raises(ValueError, match="padding: expected values >= 0"):
        sparse_conv2d(x, active, w, b, padding=-1)


# ----------------------------------------------------------------------------------------------------------
# modules


def test_sparse_batchnorm_statistics_over_active_sites():
    bn = nn.BatchNorm2d(5, momentum=0.3).double()
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    sbn = SparseBatchNorm2d.from_dense(bn)
    assert sbn.weight is bn.weight and sbn.running_mean is bn.running_mean
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    active = torch.rand(3, 7, 6) < 0.4
    with sparse_context(active):
        y = sbn(x)
    rows = x.permute(0, 2, 3, 1)[active]  # [n, C] active sites only
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    expect = (
        (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight[:, None, None]
        + bn.bias[:, None, None]
    ) * active.unsqueeze(1)
    assert_close(y, expect, name="bn out")
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(expect, x, g)[0], name="bn dx")
    assert_close(bn.running_mean, 0.3 * mean.detach(), name="running_mean")
    assert_close(bn.running_var, 0.7 + 0.3 * rows.var(0, unbiased=True).detach(), name="running_var")
    plain = SparseBatchNorm2d(5, affine=False).double()
    with sparse_context(active):
        y_plain = plain(x)
    expect_plain = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * active.unsqueeze(1)
    assert_close(y_plain, expect_plain, name="bn without affine")
    sbn.eval()
    with sparse_context(active):
        y_eval = sbn(x)
    dense_eval = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert_close(y_eval, dense_eval * active.unsqueeze(1), name="bn eval")


def test_sparse_layernorm_and_pools():
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    active = torch.rand(2, 9, 8) < 0.5
    m = active.unsqueeze(1)
    ln = SparseLayerNorm(6, eps=1e-6).double()
    nn.init.normal_(ln.weight)
    with sparse_context(active):
        y = ln(x)
        mp = SparseMaxPool2d(3, 2, 1)(x)
        ap = SparseAvgPool2d(2)(x)
        gp = SparseAdaptiveAvgPool2d(1)(x)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2) * m
    assert_close(y, ref, name="layernorm")
    a2 = downsample_active(active, 2, (5, 4))
    mref = F.max_pool2d(x.masked_fill(~m, float("-inf")), 3, 2, 1)
    assert_close(mp, torch.where(a2.unsqueeze(1), mref, torch.zeros(())), name="maxpool")
    assert_close(
        ap, F.avg_pool2d(x * m, 2) * downsample_active(active, 2, (4, 4)).unsqueeze(1), name="avgpool"
    )
    cnt = active.sum((1, 2)).clamp_min(1).double()
    assert_close(gp.flatten(1), (x * m).sum((2, 3)) / cnt[:, None], name="global pool")


# small ResNet and ConvNeXt built from plain torch modules (torchvision is not installed)


class _Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        self.layer1 = _Bottleneck(8, 4, 16, 1)
        self.layer2 = _Bottleneck(16, 8, 24, 2)
        self.grouped = nn.Conv2d(24, 24, 3, 1, 1, groups=2)  # unsupported: stays dense, reported
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 5)

    def features(self, x):
        return self.layer2(self.layer1(self.stem(x)))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class LayerNorm2d(nn.LayerNorm):  # the torchvision name, recognised by to_sparse
    def forward(self, x):
        return F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        ).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + y


class _TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8, eps=1e-6))
        self.stage1 = _ConvNeXtBlock(8)
        self.down = nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2))
        self.stage2 = _ConvNeXtBlock(16)

    def forward(self, x):
        return self.stage2(self.down(self.stage1(self.stem(x))))


@needs_native
@pytest.mark.native
def test_to_sparse_resnet_all_active_equals_dense_and_masked_matches_reference_backend():
    dense = _TinyResNet().double()
    for m in dense.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    sparse = _TinyResNet().double()
    sparse.load_state_dict(dense.state_dict())
    report = to_sparse(sparse)
    replaced = {n: new for n, _, new in report.replaced}
    kept = {n: reason for n, _, reason in report.kept}
    assert replaced["stem.0"] == "SparseConv2d" and replaced["stem.1"] == "SparseBatchNorm2d"
    assert replaced["stem.3"] == "SparseMaxPool2d" and replaced["layer2.downsample.0"] == "SparseConv2d"
    assert replaced["pool"] == "SparseAdaptiveAvgPool2d"
    assert "groups=2" in kept["grouped"] and "per-site" in kept["fc"] and "per-site" in kept["layer1.relu"]
    assert "SparseConv2d" in str(report)
    assert sparse.stem[0].weight is not dense.stem[0].weight  # separate copies, equal values
    x = torch.randn(2, 3, 45, 38, dtype=torch.float64)  # odd sizes
    outside = sparse(x)  # outside a context: the dense model
    assert_close(outside, dense(x), name="dense mode")
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with sparse_context(torch.ones(2, 45, 38, dtype=torch.bool)):
        ys = sparse.features(xs)
    yd = dense.features(xd)
    assert_close(ys, yd, name="all-active features")
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    assert_close(xs.grad, xd.grad, name="all-active dx")
    for (n, ps), (_, pd) in zip(sparse.named_parameters(), dense.named_parameters()):
        if pd.grad is not None:
            assert_close(ps.grad, pd.grad, name=f"grad {n}")
    # SparK-style coarse mask: the native kernels inside the model agree with the dense-oracle backend
    units = torch.rand(2, 3, 3) < 0.5
    units[:, 0, 0] = True
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    outs = []
    for backend in ("native", "reference"):
        model = _TinyResNet().double()
        model.load_state_dict(dense.state_dict())
        to_sparse(model)
        xr = x.clone().requires_grad_()
        with use_backend(backend, op="sparse_conv2d"), sparse_context(units):
            y = model.features(xr)
        y.backward(torch.ones_like(y))
        outs.append((y, xr.grad, model.layer1.conv2.weight.grad))
        a6 = upsample_active(units, 2)  # 16-px units seen at layer2's stride 8: a 6 x 6 map
        assert (y * ~a6.unsqueeze(1) == 0).all()
    for a, b, name in zip(outs[0], outs[1], ("masked features", "masked dx", "masked dW")):
        assert_close(a, b, name=name)


@needs_native
@pytest.mark.native
def test_to_sparse_convnext_all_active_equals_dense():
    dense = _TinyConvNeXt().double()
    sparse = _TinyConvNeXt().double()
    sparse.load_state_dict(dense.state_dict())
    report = to_sparse(sparse)
    replaced = {n: new for n, _, new in report.replaced}
    assert replaced["stage1.dwconv"] == "SparseConv2d" and replaced["stem.1"] == "SparseLayerNorm"
    assert replaced["down.1"] == "SparseConv2d"
    assert {n for n, _, _ in report.kept} >= {"stage1.norm", "stage1.pw1", "stage1.act"}
    x = torch.randn(2, 3, 36, 28, dtype=torch.float64, requires_grad=True)
    with sparse_context(torch.ones(2, 36, 28, dtype=torch.bool)):
        ys = sparse(x)
    yd = dense(x)
    assert_close(ys, yd, name="convnext")
    gs = torch.autograd.grad(ys.sum(), (x, sparse.stage1.dwconv.weight))
    gd = torch.autograd.grad(yd.sum(), (x, dense.stage1.dwconv.weight))
    assert_close(gs[0], gd[0], name="convnext dx")
    assert_close(gs[1], gd[1], name="convnext dW")
    assert to_sparse(sparse).replaced == []  # idempotent


def test_sparse_context_errors_and_dense_fallback():
    conv = SparseConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    with sparse_context(torch.ones(3, 8, 8, dtype=torch.bool)), pytest.raises(ValueError, match="batch 3"):
        conv(x)
    with (
        sparse_context(torch.ones(2, 5, 5, dtype=torch.bool)),
        pytest.raises(ValueError, match="no activity map"),
    ):
        conv(x)
    with (
        pytest.raises(TypeError, match="sparse_context: expected a bool tensor"),
        sparse_context(torch.ones(2, 8, 8)),
    ):
        pass
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        to_sparse("resnet")


@pytest.mark.interpreter
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1)])
def test_triton_unit_path_split_k(monkeypatch, split, stride, k, device):
    """The split-K of deep small layers (forced here): fp32 partials, zeros of inactive units in every split,
    bias once, one sum; forward and the per-class dx."""
    from kernels.sparse_conv import sparse_conv2d_units_triton as tu

    monkeypatch.setattr(tu, "FORWARD_SPLIT_K", split)
    x, active, w, b = _unit_case(3, 20, 9, (2, 2), 2, k, 1, torch.float64, device)
    _forbid_site_path(monkeypatch)
    _check_against_reference(x, active, w, b, stride, k // 2, 1, torch.float64, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("k,stride,unit", [(4, 4, 8), (2, 2, 4), (2, 2, 2)])
def test_triton_unit_path_patchify_layers(monkeypatch, k, stride, unit, device):
    """ConvNeXt's stem (4x4 stride 4) and downsampling (2x2 stride 2) layers, no padding: even kernels, dx with
    s^2 parity classes of one tap each."""
    x, active, w, b = _unit_case(3, 5, 6, (2, 3), unit, k, 1, torch.float64, device)
    a_out = downsample_active(active, stride)
    inputs = SparseConv2dInputs(x, active, a_out, w, b, (stride,) * 2, (0, 0), (1, 1), 1)
    assert inputs.triton_path.startswith("units: tiled over") and "site list" not in inputs.triton_path
    _forbid_site_path(monkeypatch)
    _check_against_reference(x, active, w, b, stride, 0, 1, torch.float64, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_triton_unit_path_whole_tiny_encoder(monkeypatch, arch, device):
    """A to_sparse tiny ResNet / ConvNeXt (total stride 8) inside sparse_context(unit mask of 8-px units): every
    sparse conv runs the unit kernels (stem, strided 3x3 and 1x1 shortcut, 7x7 depthwise, patchify layers) and
    the output and every gradient match the reference backend."""
    torch.manual_seed(0)
    net = (_TinyResNet() if arch == "resnet" else _TinyConvNeXt()).double().eval()
    to_sparse(net)
    body = net.features if arch == "resnet" else net
    coarse = torch.rand(2, 2, 3) < 0.6
    coarse[0, 0, 0], coarse[1, 1, 2] = True, False
    coarse = coarse.to(device)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64, device=device)
    x = x * upsample_active(coarse, 8).unsqueeze(1)
    params = [p for p in net.parameters() if p.requires_grad]
    results = {}
    for backend in ("reference", "triton"):
        if backend == "triton":
            _forbid_site_path(monkeypatch)
        xb = x.clone().requires_grad_()
        with use_backend(backend, op="sparse_conv2d"), sparse_context(coarse):
            y = body(xb)
        grads = torch.autograd.grad(y.square().sum(), [xb] + params, allow_unused=True)
        results[backend] = (y.detach(), grads)
    (ry, rg), (ty, tg) = results["reference"], results["triton"]
    assert_close(ty, ry, name="features")
    for i, (a, r) in enumerate(zip(tg, rg)):
        if r is None:
            assert a is None
            continue
        assert_close(a, r, name=f"grad {i}")


def test_site_index_is_cached_per_map_and_rebuilt_after_an_edit():
    from kernels.sparse_conv.active import active_site_index, cached_site_index

    a = torch.rand(2, 5, 4) < 0.5
    first = cached_site_index(a)
    assert cached_site_index(a) is first
    a[0, 0, 0] = ~a[0, 0, 0]
    again = cached_site_index(a)
    assert again is not first
    want = active_site_index(a)
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])
