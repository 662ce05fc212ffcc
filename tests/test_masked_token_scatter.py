"""masked_token_scatter: Triton (interpreter on CPU) vs the float64 reference, validation, dispatch."""

import pytest
import torch
from _masked import f64, grads, triton_backend
from conftest import TOLERANCES, assert_close

import kernels
from kernels.masked import masked_token_scatter_triton as triton_scatter
from kernels.masked.masked_token_scatter import validate as validate_scatter
from kernels.masked.reference import masked_token_scatter_reference

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_outputs")]  # tests/conftest.py

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------------------
# masked_token_scatter


def make_scatter_inputs(B, N, D, dtype, device, cls, pos_rows, mask_kind="random", noncontig=False):
    if noncontig:
        x = torch.randn(N, B, 2 * D, dtype=dtype, device=device).transpose(0, 1)[:, :, ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(B, N, D, dtype=dtype, device=device)
    x.requires_grad_(True)
    mask = torch.rand(B, N, device=device) < 0.4
    if mask_kind == "rows":  # one row fully masked, one row with nothing masked
        mask[0] = True
        mask[-1] = False
    params = {
        "mask_token": torch.randn(D, dtype=dtype, device=device, requires_grad=True),
        "cls_token": torch.randn(D, dtype=dtype, device=device, requires_grad=True) if cls else None,
        "pos_embed": torch.randn(pos_rows, D, dtype=dtype, device=device, requires_grad=True)
        if pos_rows
        else None,
    }
    return x, mask, params


def check_scatter(B, N, D, dtype, device, cls, pos_rows, **kw):
    x, mask, p = make_scatter_inputs(B, N, D, dtype, device, cls, pos_rows, **kw)
    inputs = [x, p["mask_token"], p["pos_embed"], p["cls_token"]]
    with triton_backend():
        out = kernels.masked_token_scatter(x, mask, p["mask_token"], p["pos_embed"], p["cls_token"])
    ref_in = [f64(t) for t in inputs]
    ref = masked_token_scatter_reference(ref_in[0], mask, ref_in[1], ref_in[2], ref_in[3])
    assert out.dtype == dtype and out.shape == (B, N + int(cls), D)
    assert_close(out, ref, dtype=dtype, name="out")
    g = torch.randn_like(out)
    got = grads(out, inputs, g)
    want = grads(ref, ref_in, g.double())
    for name, a, e, t in zip(
        ("grad_x", "grad_mask_token", "grad_pos_embed", "grad_cls_token"), got, want, inputs
    ):
        if t is None:
            continue
        assert a.dtype == t.dtype
        # parameter grads are sums over up to B*N rows of rounded grads: scale atol with the count
        atol = TOLERANCES[dtype][0] * (1 if name == "grad_x" else B * N)
        assert_close(a, e, dtype=dtype, atol=atol, name=name)


@pytest.mark.parametrize(
    "cls,pos_rows_delta",
    [(False, None), (True, None), (False, 0), (True, 0), (True, 1)],
    ids=["plain", "cls", "pos", "cls+pos_patches", "cls+pos_all"],
)
@pytest.mark.parametrize("N,D", [(13, 100), (50, 37)])
def test_scatter_fp64_matches_reference(device, N, D, cls, pos_rows_delta):
    pos_rows = None if pos_rows_delta is None else N + pos_rows_delta
    check_scatter(3, N, D, torch.float64, device, cls, pos_rows)


def test_scatter_vit_shape_small_batch(device):
    check_scatter(2, 197, 384, torch.float32, device, cls=True, pos_rows=198)


@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_dtypes_noncontiguous_and_full_rows(device, dtype):
    check_scatter(3, 13, 100, dtype, device, cls=True, pos_rows=14, mask_kind="rows", noncontig=True)


def test_scatter_split_counts_agree(device):
    """The batch-split partial buffers (any split count) give the same parameter grads."""
    B, N, D = 5, 13, 40
    g = torch.randn(B, N + 1, D, dtype=torch.float64, device=device)
    mask = torch.rand(B, N, device=device) < 0.5
    outs = [triton_scatter.masked_token_scatter_backward(g, mask, N + 1, True, split=s) for s in (1, 2, 5)]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert_close(a, b, name="split")
    assert_close(outs[0][2], g.sum(0), name="grad_pos")


def test_scatter_mixed_param_dtype(device):
    """bf16 activations with fp32 parameters (autocast-style): output bf16, parameter grads fp32."""
    x = torch.randn(2, 13, 24, dtype=torch.bfloat16, device=device, requires_grad=True)
    tok = torch.randn(24, device=device, requires_grad=True)
    pos = torch.randn(1, 14, 24, device=device, requires_grad=True)
    cls = torch.randn(1, 1, 24, device=device, requires_grad=True)
    mask = torch.rand(2, 13, device=device) < 0.5
    with triton_backend():
        out = kernels.masked_token_scatter(x, mask, tok, pos, cls)
    ref = masked_token_scatter_reference(f64(x), mask, f64(tok), f64(pos), f64(cls).view(24))
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, dtype=torch.bfloat16, name="out")
    out.float().sum().backward()
    assert tok.grad.dtype == torch.float32 and pos.grad.shape == (1, 14, 24) and cls.grad.shape == (1, 1, 24)
    assert_close(tok.grad, mask.sum().double().expand(24), name="grad_mask_token")


def test_scatter_module(device):
    emb = kernels.MaskedTokenEmbedding(13, 64, cls_token=True, pos_embed=True).to(device)
    assert emb.pos_embed.shape == (14, 64) and emb.cls_token.shape == (64,)
    big = kernels.MaskedTokenEmbedding(196, 768, pos_embed=True)
    assert abs(big.pos_embed.std().item() - 0.02) < 0.003 and big.pos_embed.abs().max() <= 0.04 + 1e-6
    x = torch.randn(2, 13, 64, device=device)
    mask = torch.rand(2, 13, device=device) < 0.5
    with triton_backend():
        out = emb(x, mask)
    ref = masked_token_scatter_reference(x, mask, emb.mask_token, emb.pos_embed, emb.cls_token)
    assert_close(out, ref, name="module out")
    assert kernels.MaskedTokenEmbedding(13, 8, cls_token=False).cls_token is None


def test_scatter_reference_is_the_definition(device):
    """The oracle itself against an explicit per-row loop."""
    B, N, D = 2, 5, 3
    x = torch.randn(B, N, D, dtype=torch.float64, device=device)
    mask = torch.rand(B, N, device=device) < 0.5
    tok, cls = (
        torch.randn(D, dtype=torch.float64, device=device),
        torch.randn(D, dtype=torch.float64, device=device),
    )
    for pos in (
        torch.randn(N, D, dtype=torch.float64, device=device),
        torch.randn(N + 1, D, dtype=torch.float64, device=device),
    ):
        out = masked_token_scatter_reference(x, mask, tok, pos, cls)
        shift = 1 if pos.shape[0] == N else 0
        for b in range(B):
            want0 = cls + (pos[0] if shift == 0 else 0)
            assert torch.allclose(out[b, 0], want0)
            for n in range(N):
                v = tok if mask[b, n] else x[b, n]
                assert torch.allclose(out[b, n + 1], v + pos[n + 1 - shift])


def test_cpu_default_is_reference(device):
    if device.type != "cpu":
        pytest.skip("CPU dispatch check")
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    inputs = validate_scatter(x, mask, torch.zeros(8))
    assert kernels.REGISTRY["masked_token_scatter"].select(inputs).backend == "reference"
    with triton_backend():
        assert kernels.REGISTRY["masked_token_scatter"].select(inputs).backend == "triton"


def test_scatter_bad_inputs(device):
    x = torch.randn(2, 5, 8, device=device)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    tok = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="mask: expected shape"):
        kernels.masked_token_scatter(x, mask[:, :4], tok)
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        kernels.masked_token_scatter(x, mask.float(), tok)
    with pytest.raises(ValueError, match=r"mask_token: expected shape \(8,\)"):
        kernels.masked_token_scatter(x, mask, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="x: expected 3-D"):
        kernels.masked_token_scatter(x[0], mask, tok)
    with pytest.raises(TypeError, match="x: expected dtype"):
        kernels.masked_token_scatter(x.long(), mask, tok)
    with pytest.raises(ValueError, match="pos_embed: .*N\\+1 rows need cls_token"):
        kernels.masked_token_scatter(x, mask, tok, pos_embed=torch.zeros(6, 8, device=device))
    with pytest.raises(ValueError, match="pos_embed: expected shape"):
        kernels.masked_token_scatter(x, mask, tok, pos_embed=torch.zeros(5, 9, device=device))
    with pytest.raises(ValueError, match="cls_token: expected shape"):
        kernels.masked_token_scatter(x, mask, tok, cls_token=torch.zeros(9, device=device))
    with pytest.raises(ValueError, match="one device.*mask_token on meta"):
        kernels.masked_token_scatter(x, mask, torch.zeros(8, device="meta"))


@pytest.mark.cuda
def test_cuda_beit_shapes(device):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    B, N, D = 4, 196, 768
    check_scatter(B, N, D, torch.bfloat16, device, cls=True, pos_rows=N + 1)


# ----------------------------------------------------------------------------------------------------------
# the interpreter does not type-check like the compiler: build the kernels for sm_90 (no GPU needed)

@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Scatter forward and backward compiled for sm_90 as the JIT builds them at the BEiT shapes (B 256,
    N 196, D 768; unit strides as constants); no spills. All dtypes:
    ``python -m bench.static_gpu_check --ops masked_token_scatter``."""
    from _aot import run_static

    results = run_static("masked_token_scatter")
    assert len(results) == 2 and all(r["spill_stores"] == 0 for r in results)
