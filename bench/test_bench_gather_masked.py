"""gather_masked: ours vs the reference (boolean-free argsort gather) vs torch.compile of the reference;
cases and providers in bench/_masked.py.

bytes_moved is the minimal traffic the op must do: fwd 2 * B*k*D (+ mask); fwd+bwd + B*k*D read + B*N*D
grad_h written. flops: None (memory-bound).
"""

import pytest
import torch

import kernels
from bench._masked import CASES, PROVIDERS, case_shape, make_mask, run_case
from kernels.masked.gather_masked import validate
from kernels.masked.reference import gather_masked_reference

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_bench_gather_masked(bench, case, provider, phase):
    B, N, D, k, dt, dev = case_shape(case)
    full = torch.randn(B, N + 1, D, dtype=dt, device=dev, requires_grad=True)
    h = full[:, 1:]  # encoder output without the cls row: a strided view, as in the trainer
    mask = make_mask(B, N, k, dev)
    e = full.element_size()
    nbytes = 2 * B * k * D * e + B * N if phase == "fwd" else 3 * B * k * D * e + B * N * D * e + 2 * B * N
    run_case(
        bench,
        case,
        provider,
        "gather_masked",
        phase,
        kernels.gather_masked,
        gather_masked_reference,
        [full],
        (h, mask, k),
        {},
        nbytes,
        validate=validate,
    )
