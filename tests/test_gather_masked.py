"""gather_masked: Triton (interpreter on CPU) vs the float64 reference; validation, dispatch, custom op."""

import pytest
import torch
from _masked import f64, fixed_mask, triton_backend
from conftest import assert_close

import kernels
from kernels import library
from kernels.masked import gather_masked_triton as gather_triton
from kernels.masked.gather_masked import validate as validate_gather
from kernels.masked.reference import gather_masked_reference

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_outputs")]  # tests/conftest.py

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def check_gather(B, N, D, k, dtype, device, noncontig=False, variable=False):
    base = torch.randn(B, N + 1, D, dtype=dtype, device=device)
    h = (base[:, 1:] if noncontig else base[:, :N].contiguous()).requires_grad_(True)
    mask = torch.rand(B, N, device=device) < 0.4 if variable else fixed_mask(B, N, k, device)
    with triton_backend():
        out = kernels.gather_masked(h, mask, None if variable else k)
    hh = f64(h)
    ref = gather_masked_reference(hh, mask, None if variable else k)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype=dtype, atol=0, rtol=0, name="gather")
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, h, g)
    (want,) = torch.autograd.grad(ref, hh, g.double())
    assert_close(got, want, dtype=dtype, atol=0, rtol=0, name="grad_h")


@pytest.mark.parametrize("N,D,k", [(13, 100, 5), (50, 37, 20), (197, 24, 75)])
def test_gather_fp64_matches_reference(device, N, D, k):
    check_gather(3, N, D, k, torch.float64, device, noncontig=True)


@pytest.mark.parametrize("k", [0, 13], ids=["none_masked", "all_masked"])
def test_gather_empty_and_full(device, k):
    check_gather(2, 13, 40, k, torch.float32, device)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_dtypes(device, dtype):
    check_gather(2, 50, 100, 17, dtype, device, noncontig=True)


def test_gather_wide_d(device):
    check_gather(2, 13, 384, 6, torch.float32, device)


def test_gather_variable_counts(device):
    check_gather(4, 50, 33, None, torch.float32, device, noncontig=True, variable=True)
    # uniform counts detected without num_masked take the fixed path
    h = torch.randn(3, 13, 8, device=device)
    mask = fixed_mask(3, 13, 4, device)
    with triton_backend():
        assert_close(kernels.gather_masked(h, mask), h[mask], atol=0, rtol=0, name="detected k")


def test_gather_count_mismatch(device, monkeypatch):
    h = torch.randn(2, 13, 8, device=device)
    mask = torch.zeros(2, 13, dtype=torch.bool, device=device)
    mask[0, :6] = True
    mask[1, 2:5] = True
    if device.type != "cpu":  # on CUDA the count check costs a sync, so it runs only in debug mode
        monkeypatch.setenv("KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="mask: num_masked=5 but row 0 has 6"):
        kernels.gather_masked(h, mask, 5)
    # without the (host-side) check the kernel keeps the first k and NaN-fills missing slots
    out = gather_triton.gather_masked_forward(h, mask, k=5)
    assert_close(out[:5], h[0, :5], atol=0, rtol=0, name="row 0 first k")
    assert_close(out[5:8], h[1, 2:5], atol=0, rtol=0, name="row 1")
    assert torch.isnan(out[8:]).all()
    ref = gather_masked_reference(h, mask, 5)
    assert_close(ref[:8], out[:8], atol=0, rtol=0, name="reference agrees")
    assert torch.isnan(ref[8:]).all()


def test_gather_bad_inputs(device):
    h = torch.randn(2, 5, 8, device=device)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="num_masked: expected 0 <= num_masked <= N=5"):
        kernels.gather_masked(h, mask, 6)
    with pytest.raises(TypeError, match="num_masked: expected an int"):
        kernels.gather_masked(h, mask, 2.0)
    with pytest.raises(ValueError, match="mask: expected shape"):
        kernels.gather_masked(h, mask.t())
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        kernels.gather_masked(h, mask.int())
    with pytest.raises(ValueError, match="one device"):
        kernels.gather_masked(h, mask.to("meta"))


def test_gather_cpu_default_is_reference(device):
    if device.type != "cpu":
        pytest.skip("CPU dispatch check")
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    inputs = validate_gather(x, mask, 0)
    assert kernels.REGISTRY["gather_masked"].select(inputs).backend == "reference"
    with triton_backend():
        assert kernels.REGISTRY["gather_masked"].select(inputs).backend == "triton"


@pytest.mark.parametrize("num_masked", [3, None])
def test_custom_op_and_eager_agree(device, num_masked):
    """library.op("gather_masked_fwd") with its registered autograd (what a compiled graph runs) and the eager
    path give the same rows and the same gradient."""
    h = torch.randn(3, 8, 5, dtype=torch.float64, device=device)[:, 1:].requires_grad_(True)
    mask = fixed_mask(3, 7, 3, device) if num_masked else torch.rand(3, 7, device=device) < 0.5
    out = library.op("gather_masked_fwd")(h, mask, -1 if num_masked is None else num_masked)
    ref = kernels.gather_masked(h, mask, num_masked)
    assert_close(out, ref, atol=0, rtol=0, name="out")
    g = torch.randn_like(out)
    (got,), (want,) = torch.autograd.grad(out, h, g), torch.autograd.grad(ref, h, g)
    assert_close(got, want, atol=0, rtol=0, name="gh")


@pytest.mark.cuda
def test_cuda_beit_shapes(device):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    B, N, D, k = 4, 196, 768, 75
    check_gather(B, N, D, k, torch.bfloat16, device, noncontig=True)


# ----------------------------------------------------------------------------------------------------------
# the interpreter does not type-check like the compiler: build the kernels for sm_90 (no GPU needed)

@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The fixed-count gather kernel compiled for sm_90 as the JIT builds it at the BEiT shapes (B 256, N 196,
    D 768; unit strides as constants); no spills. All dtypes, both gather paths:
    ``python -m bench.static_gpu_check --ops gather_masked``."""
    from _aot import run_static

    results = run_static("gather_masked")
    assert len(results) == 1 and all(r["spill_stores"] == 0 for r in results)
