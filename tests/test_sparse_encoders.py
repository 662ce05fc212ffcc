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
