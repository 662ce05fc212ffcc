"""Helpers of the masked-op test files (test_masked_token_scatter.py, test_gather_masked.py,
test_masked_cross_entropy.py): the poisoning fixture, the forced Triton backend, masks, float64 copies."""

import pytest
import torch
from conftest import poison

import kernels


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts NaN (or a sentinel), so unwritten elements fail."""

    def alloc(shape, dtype, device):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr("kernels._buffers.empty", alloc)


def triton_backend():
    return kernels.use_backend("triton")


def fixed_mask(B, N, k, device):
    return torch.stack([torch.randperm(N, device=device) < k for _ in range(B)])


def f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def grads(out, inputs, g):
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, live, g)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]
