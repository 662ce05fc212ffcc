"""Helpers of the masked-op test files (test_masked_token_scatter.py, test_gather_masked.py,
test_masked_cross_entropy.py): the forced Triton backend, masks, float64 copies."""

import torch

import kernels


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
