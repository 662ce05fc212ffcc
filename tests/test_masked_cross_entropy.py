"""masked_cross_entropy: Triton (interpreter on CPU) vs the float64 reference; validation, dispatch,
the custom op."""

import pytest
import torch
from _masked import f64, fixed_mask, grads, triton_backend
from conftest import TOLERANCES, assert_close

import kernels
from kernels import library
from kernels.masked import masked_cross_entropy_triton as ce_triton
from kernels.masked.masked_cross_entropy import validate as validate_ce
from kernels.masked.reference import masked_cross_entropy_reference, masked_cross_entropy_rows_reference

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_outputs")]  # tests/conftest.py

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def make_ce_inputs(B, N, D, V, dtype, device, bias=True, k=None, hit_rows=True):
    h = torch.randn(B, N, D, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(V, D, dtype=dtype, device=device) / D**0.5).requires_grad_(True)
    b = torch.randn(V, dtype=dtype, device=device, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (B, N), device=device)
    if hit_rows:  # make some predictions right so the accuracy is not trivially 0
        with torch.no_grad():
            logits = torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double())
            hit = torch.rand(B, N, device=device) < 0.5
            targets = torch.where(hit, logits.argmax(-1), targets)
    mask = fixed_mask(B, N, k, device) if k is not None else torch.rand(B, N, device=device) < 0.4
    return h, w, b, targets, mask


def check_ce(
    h, w, b, targets, mask, dtype, num_masked=None, ignore_index=-100, chunk_rows=None, grad_scale=1.7
):
    with triton_backend():
        loss, acc = kernels.masked_cross_entropy(
            h,
            w,
            b,
            targets,
            mask,
            ignore_index=ignore_index,
            return_accuracy=True,
            num_masked=num_masked,
            chunk_rows=chunk_rows,
        )
    inputs = [h, w, b]
    ref_in = [f64(t) for t in inputs]
    rloss, racc = masked_cross_entropy_reference(
        ref_in[0], ref_in[1], ref_in[2], targets, mask, ignore_index, True, num_masked
    )
    low = dtype in (torch.bfloat16, torch.float16)
    tol = {"atol": 5e-2, "rtol": 2e-2} if low else {}
    assert_close(loss, rloss, dtype=dtype, name="loss", **tol)
    if dtype in (torch.float64, torch.float32):
        assert_close(acc, racc, atol=1e-6, rtol=0, name="accuracy")
    got = grads(loss * grad_scale, inputs, None)
    want = grads(rloss * grad_scale, ref_in, None)
    for name, a, e, t in zip(("grad_h", "grad_weight", "grad_bias"), got, want, inputs):
        if t is None:
            continue
        assert a.dtype == t.dtype, name
        scale = e.abs().max().item()
        gtol = {"atol": 3e-2 * scale, "rtol": 3e-2} if low else {"atol": TOLERANCES[dtype][0] * max(scale, 1)}
        assert_close(a, e, dtype=dtype, name=name, **gtol)
    return loss, acc


@pytest.mark.parametrize("N,D,V,k", [(13, 100, 37, 5), (50, 24, 101, 20)])
@pytest.mark.parametrize("bias", [True, False])
def test_ce_fp64_matches_reference(device, N, D, V, k, bias):
    h, w, b, t, m = make_ce_inputs(3, N, D, V, torch.float64, device, bias=bias, k=k)
    check_ce(h, w, b, t, m, torch.float64, num_masked=k, chunk_rows=7)


def test_ce_variable_mask_and_ignore_index(device):
    h, w, b, t, m = make_ce_inputs(4, 13, 40, 29, torch.float64, device)
    t[:, ::3] = -1
    _loss, acc = check_ce(h, w, b, t, m, torch.float64, ignore_index=-1, chunk_rows=5)
    assert 0 < acc.item() < 1
    # uniform counts without num_masked: detected (one sync), then the fixed-count gathers
    h, w, b, t, m = make_ce_inputs(3, 13, 40, 29, torch.float64, device, k=4)
    check_ce(h, w, b, t, m, torch.float64)


def test_ce_pregathered_rows_and_multi_pass(device, monkeypatch):
    """[M, D] input with mask=None; V walked in 16-wide slices (the path used when V > 16384)."""
    monkeypatch.setattr(ce_triton, "MAX_SINGLE_PASS_V", 16)
    monkeypatch.setattr(ce_triton, "MULTI_PASS_BLOCK_V", 16)
    h, w, b, t, _ = make_ce_inputs(1, 23, 30, 75, torch.float64, device)
    h2 = h.detach()[0].requires_grad_(True)
    t2 = torch.stack([t[0], t[0]], dim=1)[:, 0]  # strided targets
    assert not t2.is_contiguous()
    check_ce(h2, w, b, t2, None, torch.float64)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ce_dtypes_noncontiguous(device, dtype):
    h, w, b, t, m = make_ce_inputs(2, 50, 24, 37, dtype, device, k=9)
    hn = torch.randn(2, 51, 24, dtype=dtype, device=device)[:, 1:]
    hn.copy_(h.detach())
    hn.requires_grad_(True)
    check_ce(hn, w, b, t, m, dtype, num_masked=9, chunk_rows=8)


def test_ce_vit_like_width(device):
    h, w, b, t, m = make_ce_inputs(2, 13, 384, 50, torch.float32, device, k=5)
    check_ce(h, w, b, t, m, torch.float32, num_masked=5)


def test_ce_no_rows_counted(device):
    h, w, b, t, m = make_ce_inputs(2, 13, 16, 11, torch.float32, device)
    with triton_backend():
        loss = kernels.masked_cross_entropy(h, w, b, torch.full_like(t, -100), m)
        loss.backward()
        assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
        empty = kernels.masked_cross_entropy(h, w, b, t, torch.zeros_like(m), num_masked=0)
        assert empty.item() == 0.0


def test_ce_no_grad_and_module(device, monkeypatch):
    head = kernels.MaskedLMHead(24, 37).to(device)
    assert abs(head.weight.std().item() - 0.02) < 0.004 and head.bias.abs().max() == 0
    h = torch.randn(2, 13, 24, device=device)
    t = torch.randint(0, 37, (2, 13), device=device)
    m = fixed_mask(2, 13, 5, device)
    calls = []
    real = ce_triton.masked_cross_entropy_forward

    def spy(*args, **kwargs):
        calls.append((kwargs["need_h"], kwargs["need_w"], kwargs["need_b"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ce_triton, "masked_cross_entropy_forward", spy)
    with triton_backend():
        with torch.no_grad():
            loss_ng = head(h, t, mask=m, num_masked=5)
        loss, _acc = head(h, t, mask=m, num_masked=5, return_accuracy=True)
    assert calls == [(False, False, False), (False, True, True)]  # no grad work under no_grad
    ref = torch.nn.functional.cross_entropy(head.logits(h)[m], t[m])
    assert_close(loss_ng, ref, name="no-grad loss")
    assert_close(loss, ref, name="loss")
    loss.backward()
    ref_w = torch.autograd.grad(torch.nn.functional.cross_entropy(head.logits(h)[m], t[m]), head.weight)[0]
    assert_close(head.weight.grad, ref_w, name="grad_weight")


def test_ce_mixed_dtypes_promote(device):
    """bf16 activations with an fp32 head (no autocast): GEMMs in fp32, grads in each input's dtype."""
    h, w, b, t, m = make_ce_inputs(2, 13, 32, 19, torch.float32, device, k=5)
    hb = h.detach().bfloat16().requires_grad_(True)
    with triton_backend():
        loss = kernels.masked_cross_entropy(hb, w, b, t, m, num_masked=5)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    hr, wr, br = f64(hb), f64(w), f64(b)
    ref = masked_cross_entropy_reference(hr, wr, br, t, m, num_masked=5)
    ref.backward()
    assert_close(loss, ref, dtype=torch.float32, name="loss")
    assert_close(w.grad, wr.grad, dtype=torch.float32, name="grad_weight")
    assert_close(hb.grad, hr.grad, dtype=torch.bfloat16, name="grad_h")


def test_ce_autocast_bf16(device):
    h, w, b, t, m = make_ce_inputs(2, 13, 32, 19, torch.float32, device, k=5)
    with triton_backend(), torch.autocast(device.type, dtype=torch.bfloat16):
        loss = kernels.masked_cross_entropy(h, w, b, t, m, num_masked=5)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = masked_cross_entropy_reference(f64(h), f64(w), f64(b), t, m, num_masked=5)
    assert_close(loss, ref, atol=5e-2, rtol=2e-2, name="autocast loss")


@pytest.mark.parametrize("need", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_ce_launcher_gradient_subsets_over_chunks(device, need):
    """grad_b rides along grad_W's GEMM (ones column): every subset of needed grads, several chunks, fp64."""
    need_h, need_w, need_b = (bool(n) for n in need)
    h = torch.randn(29, 12, dtype=torch.float64, device=device)
    w = torch.randn(37, 12, dtype=torch.float64, device=device)
    b = torch.randn(37, dtype=torch.float64, device=device)
    t = torch.randint(0, 37, (29,), device=device)
    t[3] = -100
    loss, _acc, gh, gw, gb, inv_n = ce_triton.masked_cross_entropy_forward(
        h, w, b, t, chunk_rows=8, need_h=need_h, need_w=need_w, need_b=need_b
    )
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    ref = masked_cross_entropy_rows_reference(hr, wr, br, t)
    ref.backward()
    assert_close(loss, ref.detach(), name="loss")
    for got, want, on, name in ((gh, hr.grad, need_h, "grad_h"), (gw, wr.grad, need_w, "grad_w"),
                                (gb, br.grad, need_b, "grad_b")):
        if on:
            assert_close(got * inv_n, want, name=name)
        else:
            assert got is None, name


@pytest.mark.parametrize("chunk_rows", [1, 3, 29])
def test_ce_launcher_double_buffered_chunks(device, chunk_rows):
    """The chunk loop issues chunk i+1's first GEMM (into the other logit / [h | 1] buffer) before chunk i's
    softmax: one-row chunks (29 of them, each buffer reused 14 times), a ragged last chunk and a single chunk all
    match the float64 reference, so no chunk reads a buffer the next chunk's GEMM already overwrote."""
    h = torch.randn(29, 12, dtype=torch.float64, device=device)
    w = torch.randn(37, 12, dtype=torch.float64, device=device)
    b = torch.randn(37, dtype=torch.float64, device=device)
    t = torch.randint(0, 37, (29,), device=device)
    t[[3, 17]] = -100
    loss, acc, gh, gw, gb, inv_n = ce_triton.masked_cross_entropy_forward(h, w, b, t, chunk_rows=chunk_rows)
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    ref = masked_cross_entropy_rows_reference(hr, wr, br, t)
    ref.backward()
    assert_close(loss, ref.detach(), name="loss")
    for got, want, name in ((gh, hr.grad, "grad_h"), (gw, wr.grad, "grad_w"), (gb, br.grad, "grad_b")):
        assert_close(got * inv_n, want, name=name)


def test_ce_kernel_poisons_out_of_range_target(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(5, 8, device=device)
    t = torch.tensor([0, 7, -100, 2], device=device)
    loss, _acc, _gh, gw, gb, inv_n = ce_triton.masked_cross_entropy_forward(h, w, None, t, need_w=False)
    assert torch.isnan(loss) and gw is None and gb is None and inv_n.item() == pytest.approx(1 / 3)


def test_ce_bad_inputs(device, monkeypatch):
    if device.type != "cpu":  # the target-range check costs a sync on CUDA: debug mode only
        monkeypatch.setenv("KERNELS_DEBUG", "1")
    h = torch.randn(2, 5, 8, device=device)
    w = torch.randn(11, 8, device=device)
    b = torch.zeros(11, device=device)
    t = torch.randint(0, 11, (2, 5), device=device)
    m = torch.ones(2, 5, dtype=torch.bool, device=device)
    ce = kernels.masked_cross_entropy
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, 8\)"):
        ce(h, w[:, :7], b, t, m)
    with pytest.raises(ValueError, match=r"bias: expected shape \(11,\)"):
        ce(h, w, b[:10], t, m)
    with pytest.raises(ValueError, match="targets: expected shape"):
        ce(h, w, b, t[:, :4], m)
    with pytest.raises(TypeError, match="targets: expected dtype"):
        ce(h, w, b, t.float(), m)
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 11\)"):
        ce(h, w, b, t + 11, m)
    with pytest.raises(ValueError, match="mask: expected shape"):
        ce(h, w, b, t, m[:, :3])
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        ce(h, w, b, t, m.long())
    with pytest.raises(ValueError, match="mask: given, so h must be"):
        ce(h[0], w, b, t[0], m[0])
    with pytest.raises(ValueError, match="one device.*weight on meta"):
        ce(h, w.to("meta"), b, t, m)


def test_cpu_default_is_reference(device):
    if device.type != "cpu":
        pytest.skip("CPU dispatch check")
    h, w, b, t, m = make_ce_inputs(2, 5, 8, 7, torch.float32, device, k=2)
    inputs = validate_ce(h, w, b, t, m, num_masked=2)
    assert kernels.REGISTRY["masked_cross_entropy"].select(inputs).backend == "reference"
    with triton_backend():
        assert kernels.REGISTRY["masked_cross_entropy"].select(inputs).backend == "triton"


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False)])
def test_custom_op_and_eager_agree(device, with_bias, need):
    """library.op("masked_cross_entropy_fwd") with its registered autograd (what a compiled graph runs, here
    on gathered rows) and the eager path give the same loss, accuracy and gradients."""
    h, w, b, t, m = make_ce_inputs(3, 9, 6, 11, torch.float64, device, bias=with_bias, k=4)
    t[0, m[0].nonzero()[0, 0]] = -100  # one ignored masked row
    rloss, racc = kernels.masked_cross_entropy(h, w, b, t, m, return_accuracy=True, num_masked=4)
    h2 = kernels.gather_masked(h, m, 4)
    loss, acc, *_ = library.op("masked_cross_entropy_fwd")(h2, w, b, t[m], -100, torch.float64, 0, *need)
    assert_close(loss, rloss, name="loss")
    assert_close(acc, racc, name="accuracy")
    wanted = [x for x, n in zip((h, w, b), need) if x is not None and n]
    got = torch.autograd.grad(loss * 1.7, wanted)
    want = torch.autograd.grad(rloss * 1.7, wanted)
    for a, e in zip(got, want):
        assert_close(a, e, name="grad")


# ----------------------------------------------------------------------------------------------------------
# CUDA only: BEiT-sized inputs, and no host synchronisation on the fast paths


@pytest.mark.cuda
def test_cuda_beit_shapes(device):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    B, N, D, k, V = 4, 196, 768, 75, 8192
    h, w, b, t, m = make_ce_inputs(B, N, D, V, torch.bfloat16, device, k=k)
    check_ce(h, w, b, t, m, torch.bfloat16, num_masked=k, chunk_rows=128)


@pytest.mark.cuda
def test_cuda_side_stream_overlap_matches_one_stream(device, monkeypatch):
    """On CUDA the next chunk's first GEMM runs on a side stream: the same loss and gradients as the one-stream
    order (overlap=False), with the side stream really used, no host sync, and the main stream's later work
    ordered after it (the caller reads the results without any synchronisation of its own)."""
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    M, D, V = 1000, 256, 3000
    h = torch.randn(M, D, device=device, dtype=torch.bfloat16)
    w = torch.randn(V, D, device=device, dtype=torch.bfloat16) * 0.05
    b = torch.randn(V, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, V, (M,), device=device)
    used = []
    real = ce_triton._side_stream
    monkeypatch.setattr(ce_triton, "_side_stream", lambda dev: used.append(dev) or real(dev))
    one = ce_triton.masked_cross_entropy_forward(h, w, b, t, chunk_rows=96, overlap=False)
    assert not used
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        two = ce_triton.masked_cross_entropy_forward(h, w, b, t, chunk_rows=96, overlap=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert used
    for a, e, name in zip(two, one, ("loss", "accuracy", "grad_h", "grad_w", "grad_b", "inv_n")):
        assert torch.equal(a, e), name


@pytest.mark.cuda
def test_cuda_fast_paths_do_not_sync(device):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    B, N, D, k, V = 8, 196, 256, 75, 1000
    x = torch.randn(B, N, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    mask = fixed_mask(B, N, k, device)
    emb = kernels.MaskedTokenEmbedding(N, D, pos_embed=True).to(device)
    head = kernels.MaskedLMHead(D, V).to(device)
    t = torch.randint(0, V, (B, N), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h = emb(x, mask)
        loss = head(h[:, 1:], t, mask=mask, num_masked=k)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and x.grad is not None and emb.mask_token.grad is not None


# ----------------------------------------------------------------------------------------------------------
# the interpreter does not type-check like the compiler: build the kernel for sm_90 (no GPU needed)

@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The cross-entropy kernel compiled for sm_90 as the JIT builds it at the BEiT shapes (V 8192; unit
    strides as constants); no spills. All dtypes, V = 65536:
    ``python -m bench.static_gpu_check --ops masked_cross_entropy``."""
    from _aot import run_static

    results = run_static("masked_cross_entropy")
    assert len(results) == 1 and all(r["spill_stores"] == 0 for r in results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_weight_chunks_accumulate_in_fp32(dtype):
    """Each chunk's grad_W product reaches the fp32 accumulator unrounded: 1 + 2^-12 is exact in fp32 but not
    in bf16 (8 bits) or fp16 (11 bits), so a product rounded to the compute dtype first would give 1."""
    from kernels.masked import masked_cross_entropy_triton as ce

    acc = torch.zeros(1, 1, dtype=torch.float32)
    a = torch.tensor([[1.0, 2.0**-12]], dtype=dtype)
    b = torch.ones(2, 1, dtype=dtype)
    out = ce._accumulate_mm(acc, a, b)
    assert out.dtype == torch.float32
    assert out.item() == 1.0 + 2.0**-12
