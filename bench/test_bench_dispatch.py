"""Eager dispatch overhead per op call at tiny shapes (where the call, not the maths, is the cost).

Every op is one custom op (``torch.ops.ssl_kernels.<op>_fwd``) whose autograd formula is written once
(kernels/_op.py); the eager public function runs the same forward/backward functions through a plain
``autograd.Function`` (or the reference directly) because custom-op dispatch costs tens of microseconds a call.
This file measures that choice, forward + backward, on the CPU (the reference or native backend) and on CUDA (the
kernel backend):

    eager       the public function (``kernels.<op>``): validation, backend selection, the eager wrapper
    custom-op   the registered op called directly (what a compiled graph runs), same backend
    reference   the backend's maths called bare (``kernels/<family>/reference.py``): no validation, no dispatch
"""

import pytest
import torch

import kernels
from bench.conftest import DRY_RUN, GPU
from kernels import library
from kernels.attn.reference import attention_reference, window_attention_reference
from kernels.masked.reference import gather_masked_reference, masked_token_scatter_reference
from kernels.sparse_conv.reference import sparse_conv2d_reference


def _leaf(t):
    return t.detach().requires_grad_(t.is_floating_point())


def _scatter(dev):
    x, tok = _leaf(torch.randn(2, 16, 32, device=dev)), _leaf(torch.zeros(32, device=dev))
    mask = torch.rand(2, 16, device=dev) < 0.5
    return {
        "eager": lambda: kernels.masked_token_scatter(x, mask, tok),
        "custom-op": lambda: library.op("masked_token_scatter_fwd")(x, mask, tok, None, None),
        "reference": lambda: masked_token_scatter_reference(x, mask, tok),
    }, "B2 N16 D32"


def _gather(dev):
    h = _leaf(torch.randn(2, 16, 32, device=dev))
    mask = torch.stack([torch.randperm(16, device=dev) < 6 for _ in range(2)])
    return {
        "eager": lambda: kernels.gather_masked(h, mask, 6),
        "custom-op": lambda: library.op("gather_masked_fwd")(h, mask, 6),
        "reference": lambda: gather_masked_reference(h, mask, 6),
    }, "B2 N16 D32 k6"


def _attention(dev):
    q, k, v = (_leaf(torch.randn(1, 2, 16, 16, device=dev)) for _ in range(3))
    bias = _leaf(torch.randn(2, 16, 16, device=dev))
    return {
        "eager": lambda: kernels.attention(q, k, v, bias),
        "custom-op": lambda: library.op("attention_fwd")(q, k, v, bias, 0.25, False)[0],
        "reference": lambda: attention_reference(q, k, v, bias),
    }, "B1 H2 N16 d16 +bias"


def _window_attention(dev):
    q, k, v = (_leaf(torch.randn(4, 2, 16, 16, device=dev)) for _ in range(3))
    bias = _leaf(torch.randn(2, 16, 16, device=dev))
    return {
        "eager": lambda: kernels.window_attention(q, k, v, bias),
        "custom-op": lambda: library.op("window_attention_fwd")(q, k, v, bias, None, 0.25),
        "reference": lambda: window_attention_reference(q, k, v, bias),
    }, "B*nW4 H2 N16 d16 +bias"


def _sparse_conv2d(dev):
    x = _leaf(torch.randn(1, 8, 6, 6, device=dev).contiguous(memory_format=torch.channels_last))
    active = torch.rand(1, 6, 6, device=dev) < 0.5
    w = _leaf(torch.randn(8, 8, 3, 3, device=dev))
    return {
        "eager": lambda: kernels.sparse_conv2d(x, active, w, None, 1, 1)[0],
        "custom-op": lambda: library.op("sparse_conv2d_fwd")(x, active, active, w, None, [1, 1], [1, 1], [1, 1], 1),
        "reference": lambda: sparse_conv2d_reference(x, active, active, w, None, 1, 1),
    }, "B1 C8 6x6 3x3"


CASES = {"masked_token_scatter": _scatter, "gather_masked": _gather, "attention": _attention,
         "window_attention": _window_attention, "sparse_conv2d": _sparse_conv2d}
PROVIDERS = ["eager", "custom-op", "reference"]


def _fwd_bwd(fn):
    def run():
        out = fn()
        out.sum().backward()
        return out

    return run


def _run(bench, op, provider, dev):
    calls, shape = CASES[op](dev)
    bench(_fwd_bwd(calls[provider]), kernel=f"dispatch {op}", provider=provider, shape=shape, dtype=torch.float32,
          device=str(dev), rounds=1 if DRY_RUN else 200, graphs=False)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(CASES))
def test_dispatch_cpu(bench, op, provider):
    _run(bench, op, provider, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(CASES))
def test_dispatch_cuda(bench, op, provider):
    if DRY_RUN:
        pytest.skip("the CPU cases above are the dry run of this file")
    _run(bench, op, provider, GPU)
