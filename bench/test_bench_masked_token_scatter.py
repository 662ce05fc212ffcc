"""masked_token_scatter: ours vs the eager anchor (BEiT/timm style ``torch.where``/``cat``/``+pos``) vs
torch.compile of the reference; cases and providers in bench/_masked.py.

bytes_moved is the minimal traffic the op must do (reads of its inputs once, writes of its outputs once):
    fwd      x at the B*(N-k) unmasked rows only (masked rows are never read) + mask + out B*(N+1)*D
             + the D-vectors / pos table once;
    fwd+bwd  + grad_out B*(N+1)*D read + grad_x B*N*D written + mask + fp32 parameter grads
flops: None (memory-bound).
"""

import pytest
import torch

import kernels
from bench._masked import CASES, PROVIDERS, case_shape, make_mask, run_case
from kernels.masked.masked_token_scatter import validate
from kernels.masked.reference import masked_token_scatter_reference

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_bench_masked_token_scatter(bench, case, provider, phase):
    B, N, D, k, dt, dev = case_shape(case)
    x = torch.randn(B, N, D, dtype=dt, device=dev, requires_grad=True)
    mask = make_mask(B, N, k, dev)
    tok = torch.randn(D, device=dev, requires_grad=True)
    pos = torch.randn(N + 1, D, device=dev, requires_grad=True)
    cls = torch.randn(D, device=dev, requires_grad=True)
    e = x.element_size()
    params = (3 * D + (N + 1) * D) * 4  # mask token, cls token, pos table (fp32), read once
    fwd_bytes = B * (N - k) * D * e + B * N + B * (N + 1) * D * e + params  # masked rows of x are never read
    bwd_bytes = B * (N + 1) * D * e + B * N * D * e + B * N + params  # grad_out read, grad_x written, param grads
    nbytes = fwd_bytes if phase == "fwd" else fwd_bytes + bwd_bytes
    run_case(
        bench,
        case,
        provider,
        "masked_token_scatter",
        phase,
        kernels.masked_token_scatter,
        masked_token_scatter_reference,
        [x, tok, pos, cls],
        (x, mask, tok, pos, cls),
        {},
        nbytes,
        validate=validate,
    )
