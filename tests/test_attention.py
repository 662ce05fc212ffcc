"""kernels.attention: fused attention with an additive (relative position) bias and its gradients.

Triton cases run under TRITON_INTERPRET=1 on CPU (small shapes) and natively with --device cuda.
Every kernel output buffer is NaN-poisoned at allocation (``poisoned_alloc``), so an element a kernel
fails to write shows up as a NaN against the float64 reference (``kernels._buffers.empty`` is patched).
"""

import math

import pytest
import torch
from conftest import assert_close, poison

import kernels
from kernels import MultiheadSelfAttention, NotSupportedError, RelativePositionBias, attention, use_backend
from kernels.attn.attention import OP as attention_op
from kernels.attn.attention import deterministic_requested
from kernels.attn.attention import validate as attention_inputs
from kernels.attn.reference import attention_reference
from kernels.attn.relative_position import relative_position_index

interpreter = pytest.mark.interpreter


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every buffer the launchers allocate (``kernels._buffers.empty``) starts NaN-filled (poisoned) during the
    test, so an element a kernel fails to write fails the comparison."""

    def alloc(shape, dtype, device):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr("kernels._buffers.empty", alloc)


def _bias(kind, B, H, Nq, Nk, dtype, device):
    shapes = {
        None: None,
        "shared": (H, Nq, Nk),
        "shared4": (1, H, Nq, Nk),
        "batch": (B, H, Nq, Nk),
        "head_bcast": (B, 1, Nq, Nk),
        "shared_nograd": (H, Nq, Nk),
    }
    shape = shapes[kind]
    if shape is None:
        return None
    bias = torch.randn(shape, dtype=dtype, device=device)
    return bias.requires_grad_(kind != "shared_nograd")


def _leaves(q, k, v, bias):
    return [t for t in (q, k, v, bias) if t is not None and t.requires_grad]


def _run(q, k, v, bias, grad, backend, **kw):
    with use_backend(backend, op="attention"):
        out = attention(q, k, v, bias, **kw)
    grads = torch.autograd.grad(out, _leaves(q, k, v, bias), grad)
    return out, grads


def _reference64(q, k, v, bias, grad, scale=None):
    c = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, bias)]
    out = attention_reference(*c, scale=scale)
    grads = torch.autograd.grad(out, _leaves(*c), grad.double())
    return out, grads


def _fresh(B, H, Nq, Nk, d, dtype, device, bias_kind):
    q = torch.randn(B, H, Nq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, H, Nk, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, H, Nk, d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, _bias(bias_kind, B, H, Nq, Nk, dtype, device)


NAMES = ("dq", "dk", "dv", "dbias")

FP32_CASES = [
    # B, H, Nq, Nk, d, bias kind
    (1, 2, 13, 13, 32, None),
    (2, 2, 13, 13, 64, "shared"),
    (2, 2, 50, 50, 32, "batch"),
    (2, 2, 50, 50, 64, "shared4"),
    (2, 2, 50, 50, 32, "shared_nograd"),
    (2, 2, 37, 37, 32, "head_bcast"),
    (2, 2, 1, 1, 32, "shared"),
    (1, 2, 13, 50, 32, "shared"),  # Nq != Nk
    (2, 1, 17, 17, 32, "shared"),  # one q-tile: the dbias band summed in registers; key tail only
    (2, 1, 197, 197, 32, "shared"),  # ViT's N: prepared bias, 6 full key tiles + tail, dbias band read-add-write
]


# the flag is accepted and changes nothing now (every mode is deterministic): one shared-bias case with it set
FP32_PARAMS = [(*case, False) for case in FP32_CASES] + [(*FP32_CASES[1], True)]


@interpreter
@pytest.mark.parametrize("B,H,Nq,Nk,d,bias_kind,deterministic", FP32_PARAMS)
def test_triton_fp32_matches_float64_reference(device, poisoned_alloc, B, H, Nq, Nk, d, bias_kind, deterministic):
    q, k, v, bias = _fresh(B, H, Nq, Nk, d, torch.float32, device, bias_kind)
    grad = torch.randn(B, H, Nq, d, device=device)
    out, grads = _run(q, k, v, bias, grad, "triton", deterministic=deterministic)
    ref, ref_grads = _reference64(q, k, v, bias, grad)
    assert out.dtype == torch.float32 and out.shape == (B, H, Nq, d)
    assert_close(out, ref, dtype=torch.float32, name="out")
    assert len(grads) == len(ref_grads) == (4 if bias_kind not in (None, "shared_nograd") else 3)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)
    if bias is not None and bias.requires_grad:
        assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype


def _max_err(a, ref):
    return (a.detach().double() - ref.detach().double()).abs().max().item()


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,H,Nq,Nk,d,bias_kind",
    [(2, 2, 50, 50, 64, "shared"), (1, 2, 13, 13, 32, "batch"), (2, 1, 37, 37, 32, None)],
)
def test_triton_low_precision_within_2x_torch_error(device, poisoned_alloc, dtype, B, H, Nq, Nk, d, bias_kind):
    """Error vs float64 at most 2x that of eager PyTorch in the same dtype (+ one ulp of the magnitude)."""
    q, k, v, bias = _fresh(B, H, Nq, Nk, d, dtype, device, bias_kind)
    grad = torch.randn(B, H, Nq, d, device=device, dtype=dtype)
    out, grads = _run(q, k, v, bias, grad, "triton")
    low, low_grads = _run(q, k, v, bias, grad, "reference")
    ref, ref_grads = _reference64(q, k, v, bias, grad)
    eps = torch.finfo(dtype).eps
    for name, ours, eager, r in zip(("out",) + NAMES, (out, *grads), (low, *low_grads), (ref, *ref_grads)):
        assert ours.dtype == dtype
        assert torch.isfinite(ours).all(), f"{name}: non-finite values"
        ours_err, eager_err = _max_err(ours, r), _max_err(eager, r)
        bound = 2.0 * eager_err + eps * r.abs().max().item()
        assert ours_err <= bound, f"{name}: error {ours_err:.3g} > 2 x eager {eager_err:.3g} (+ulp) in {dtype}"


@interpreter
def test_triton_low_precision_fp32_bias_with_bf16_inputs(device, poisoned_alloc):
    """A float32 table-derived bias with bf16 activations (autocast layout): dbias comes back in float32."""
    B, H, N, d = 2, 2, 50, 32
    q, k, v, _ = _fresh(B, H, N, N, d, torch.bfloat16, device, None)
    bias = torch.randn(H, N, N, device=device, requires_grad=True)
    grad = torch.randn(B, H, N, d, device=device, dtype=torch.bfloat16)
    out, grads = _run(q, k, v, bias, grad, "triton")
    low, low_grads = _run(q, k, v, bias, grad, "reference")
    ref, ref_grads = _reference64(q, k, v, bias, grad)
    assert grads[3].dtype == torch.float32
    for name, ours, eager, r in zip(("out",) + NAMES, (out, *grads), (low, *low_grads), (ref, *ref_grads)):
        bound = 2.0 * _max_err(eager, r) + torch.finfo(torch.bfloat16).eps * r.abs().max().item()
        assert _max_err(ours, r) <= bound, name


@interpreter
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("N", [17, 50])
def test_dbias_is_deterministic_by_construction(device, poisoned_alloc, monkeypatch, groups, N):
    """A default run and a deterministic=True run are bitwise equal (the flag changes nothing any more); the
    grouped dK/dV kernel sums dbias over its batch group in registers (N=17: one q-tile) or in its own band of
    the group's partial (N=50: two q-tiles); groups=2 with B=3 leaves a short last group."""
    from kernels.attn import attention_triton as triton_kernels

    monkeypatch.setattr(triton_kernels, "_batch_groups", lambda programs, B, dev, sms=None: groups)
    B, H, d = 3, 2, 32
    q, k, v, bias = _fresh(B, H, N, N, d, torch.float32, device, "shared")
    grad = torch.randn(B, H, N, d, device=device)
    runs = [_run(q, k, v, bias, grad, "triton", deterministic=det)[1] for det in (False, True)]
    for other in runs[1:]:
        for a, b, name in zip(runs[0], other, NAMES):
            assert torch.equal(a, b), f"{name} differs between two runs"
    _, ref_grads = _reference64(q, k, v, bias, grad)
    for name, g, r in zip(NAMES, runs[0], ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)


@interpreter
@pytest.mark.parametrize("peel", [True, False])
@pytest.mark.parametrize("N", [13, 64, 50])
def test_peeled_and_masked_key_loops(device, poisoned_alloc, monkeypatch, peel, N):
    """The forward and dQ kernels' key loop both ways, whatever the dtype's default (peeled for 2-byte d=64):
    N=13 is the tail alone, N=64 two full tiles and no tail, N=50 one full tile and the tail (32-wide tiles)."""
    from kernels.attn import attention_triton as triton_kernels

    monkeypatch.setattr(triton_kernels, "peel_tiles", lambda dtype, block_d: peel)
    B, H, d = 2, 1, 32
    q, k, v, bias = _fresh(B, H, N, N, d, torch.float32, device, "shared")
    grad = torch.randn(B, H, N, d, device=device)
    out, grads = _run(q, k, v, bias, grad, "triton")
    ref, ref_grads = _reference64(q, k, v, bias, grad)
    assert_close(out, ref, dtype=torch.float32, name="out")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)


@interpreter
def test_forward_autotunes_between_candidates(device, poisoned_alloc, monkeypatch):
    """The CUDA launcher's autotuned forward (two tile candidates, here 32- and 64-row q-tiles) under the
    interpreter, timed on the host: either candidate's result is the float64 reference's, and the backward
    (its own tiles) takes the autotuned forward's lse2."""
    import time

    from kernels.attn import attention_triton as triton_kernels

    def host_bench(fn, quantiles=None):
        t0 = time.perf_counter()
        fn()
        return [time.perf_counter() - t0] * 3

    cands = [triton_kernels._launch(32, 32, 32, 4, 1), triton_kernels._launch(64, 32, 32, 4, 1)]
    monkeypatch.setattr(triton_kernels, "AUTOTUNE_BENCH", host_bench)
    monkeypatch.setattr(triton_kernels, "_FWD_TUNED", {})
    monkeypatch.setattr(triton_kernels, "forward_configs", lambda *args, **kw: cands)
    B, H, N, d = 2, 2, 50, 32
    q, k, v, bias = _fresh(B, H, N, N, d, torch.float32, device, "shared")
    grad = torch.randn(B, H, N, d, device=device)
    out, grads = _run(q, k, v, bias, grad, "triton")
    ref, ref_grads = _reference64(q, k, v, bias, grad)
    assert len(triton_kernels._FWD_TUNED) == 1
    assert_close(out, ref, dtype=torch.float32, name="out")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)


def test_forward_candidates_and_batch_groups():
    """The launch plan without a GPU: the 128-row, 8-warp forward tile is an autotune candidate for 2-byte inputs
    with d <= 64 next to the default; the dK/dV batch groups fill ~4 programs per SM (ViT-B on 132 SMs: 11
    groups of 24 batch elements); the grouped dK/dV kernel's q-tile narrows to 32 for the read-add-write band."""
    from kernels.attn import attention_triton as tk

    cuda = torch.device("cuda")
    fwd = tk.forward_configs(197, 64, torch.bfloat16, cuda, capability=(9, 0))
    assert [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in fwd] == [(64, 64, 4), (128, 64, 8)]
    assert len(tk.forward_configs(197, 128, torch.bfloat16, cuda, capability=(9, 0))) == 1
    assert len(tk.forward_configs(197, 64, torch.bfloat16, torch.device("cpu"))) == 1
    groups = tk._batch_groups(4 * 12, 256, cuda, sms=132)
    assert groups == 11 and math.ceil(256 / groups) == 24
    assert tk._batch_groups(4 * 12, 3, cuda, sms=132) == 3
    assert tk._batch_groups(4 * 12, 256, torch.device("cpu")) == 1
    bwd = tk._blocks(197, 64, torch.bfloat16, cuda, True, capability=(9, 0))
    assert tk.dkdv_blocks(bwd, 197, True, cuda, capability=(9, 0))["BLOCK_M"] == 32  # the read-add-write band
    assert tk.dkdv_blocks(bwd, 50, True, cuda, capability=(9, 0)) == bwd  # one q-tile: the band in registers
    assert tk.peel_tiles(torch.bfloat16, 64) and not tk.peel_tiles(torch.float32, 64)


def test_deterministic_request_sources(monkeypatch):
    monkeypatch.delenv("KERNELS_DETERMINISTIC", raising=False)
    assert deterministic_requested(None) is torch.are_deterministic_algorithms_enabled()
    assert deterministic_requested(True) is True
    monkeypatch.setenv("KERNELS_DETERMINISTIC", "1")
    assert deterministic_requested(None) is True
    assert deterministic_requested(False) is False


@interpreter
def test_non_contiguous_inputs_from_qkv_view(device, poisoned_alloc):
    """q/k/v as strided views of one qkv tensor, a strided grad_out and a transposed bias view."""
    B, N, H, d = 2, 50, 2, 32
    qkv = torch.randn(B, N, 3, H, d, device=device, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    bias_t = torch.randn(H, N, N, device=device, requires_grad=True)
    bias = bias_t.transpose(-1, -2)
    grad = torch.randn(B, N, H, d, device=device).transpose(1, 2)
    with use_backend("triton", op="attention"):
        out = attention(q, k, v, bias)
    g_qkv, g_bias = torch.autograd.grad(out, (qkv, bias_t), grad)

    qkv64 = qkv.detach().double().requires_grad_()
    bias64 = bias_t.detach().double().requires_grad_()
    q6, k6, v6 = qkv64.permute(2, 0, 3, 1, 4).unbind(0)
    ref = attention_reference(q6, k6, v6, bias64.transpose(-1, -2))
    r_qkv, r_bias = torch.autograd.grad(ref, (qkv64, bias64), grad.double())
    assert_close(out, ref, dtype=torch.float32, name="out")
    assert_close(g_qkv, r_qkv, dtype=torch.float32, name="dqkv")
    assert_close(g_bias, r_bias, dtype=torch.float32, name="dbias")


@interpreter
def test_output_layout_makes_head_merge_free(device):
    q, k, v, _ = _fresh(2, 2, 13, 13, 32, torch.float32, device, None)
    with use_backend("triton", op="attention"):
        out = attention(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()


@interpreter
def test_masking_bias_with_minus_inf(device, poisoned_alloc):
    """-inf entries in a (non-learnable) bias act as a mask; rows keep at least one finite entry."""
    B, H, N, d = 1, 2, 37, 32
    q, k, v, _ = _fresh(B, H, N, N, d, torch.float32, device, None)
    bias = torch.randn(H, N, N, device=device)
    bias[:, :, 5:30] = float("-inf")
    grad = torch.randn(B, H, N, d, device=device)
    out, grads = _run(q, k, v, bias, grad, "triton")
    ref, ref_grads = _reference64(q, k, v, bias, grad)
    assert_close(out, ref, dtype=torch.float32, name="out")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_backend_is_the_cpu_default_and_matches_sdpa(dtype):
    B, H, N, d = 2, 3, 13, 16
    q, k, v, bias = _fresh(B, H, N, N, d, dtype, torch.device("cpu"), "shared")
    assert attention_op.select(attention_inputs(q, k, v, bias, 0.25, False)).backend == "reference"
    out = attention(q, k, v, bias)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert_close(out, sdpa, dtype=dtype, name="out")
    scaled = attention(q, k, v, bias, scale=0.3)
    manual = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + bias, -1) @ v
    assert_close(scaled, manual, dtype=dtype, name="scaled")


# ------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 2, 13, 32)
    k = torch.randn(2, 2, 13, 32)
    v = torch.randn(2, 2, 13, 32)
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must be \[B, H, Nk, d\]"):
        attention(q, torch.randn(2, 2, 13, 16), v)
    with pytest.raises(ValueError, match=r"k must be \[B, H, Nk, d\]"):
        attention(q, torch.randn(2, 3, 13, 32), v)
    with pytest.raises(ValueError, match=r"v must have the shape of k"):
        attention(q, k, torch.randn(2, 2, 12, 32))
    with pytest.raises(TypeError, match=r"share a dtype.*q=torch.float32.*k=torch.float16"):
        attention(q, k.half(), v)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(.*\), got int64"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match=r"k: expected a torch.Tensor, got None"):
        attention(q, None, v)
    with pytest.raises(ValueError, match=r"bias of shape \(3, 13, 13\) does not broadcast"):
        attention(q, k, v, torch.randn(3, 13, 13))
    with pytest.raises(ValueError, match=r"bias of shape \(2, 13, 12\) does not broadcast"):
        attention(q, k, v, torch.randn(2, 13, 12))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        attention(q, k, v, torch.randn(3, 2, 13, 13))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        attention(q, k, v, torch.randn(1, 1, 2, 13, 13))
    with pytest.raises(TypeError, match=r"bias: expected dtype in \(.*\), got int32"):
        attention(q, k, v, torch.ones(2, 13, 13, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"scale must be a real number, got Tensor"):
        attention(q, k, v, scale=torch.tensor(0.1))


@interpreter
def test_unsupported_head_dim_is_refused_by_triton_with_reason():
    q = torch.randn(1, 1, 13, 160)
    with use_backend("triton", op="attention"):
        with pytest.raises(NotSupportedError, match=r"head dim 160 is not supported"):
            attention(q, q, q)
        with pytest.raises(NotSupportedError, match=r"float64 is not supported"):
            attention(q.double()[..., :32], q.double()[..., :32], q.double()[..., :32])
    # without forcing, dispatch falls back to the reference, which takes any head dim
    assert attention(q, q, q).shape == q.shape


# ------------------------------------------------------------------------------------------------------------
# relative position bias


def _brute_force_index(wh, ww):
    n = wh * ww
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    table_index = {}
    for dy in range(-(wh - 1), wh):
        for dx in range(-(ww - 1), ww):
            table_index[(dy, dx)] = len(table_index)  # row-major over (dy, dx), both ascending
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n + 1):
        for j in range(n + 1):
            if i == 0 and j == 0:
                index[i, j] = rows - 1
            elif i == 0:
                index[i, j] = rows - 3
            elif j == 0:
                index[i, j] = rows - 2
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, ww), divmod(j - 1, ww)
                index[i, j] = table_index[(yi - yj, xi - xj)]
    return index


@pytest.mark.parametrize("window", [(3, 3), (2, 5), (14, 14)])
def test_relative_position_index_matches_brute_force(window):
    idx = relative_position_index(window)
    assert torch.equal(idx, _brute_force_index(*window))
    assert torch.equal(relative_position_index(window, with_cls_token=False), idx[1:, 1:])


def test_relative_position_bias_module():
    rpb = RelativePositionBias((14, 14), num_heads=12)
    assert rpb.relative_position_bias_table.shape == (732, 12)
    assert torch.count_nonzero(rpb.relative_position_bias_table) == 0  # BEiT: zero init
    assert rpb.relative_position_index.shape == (197, 197)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    out = rpb()
    assert out.shape == (12, 197, 197) and out.is_contiguous()
    idx = rpb.relative_position_index
    table = rpb.relative_position_bias_table
    for h, i, j in [(0, 0, 0), (3, 0, 5), (5, 7, 0), (11, 100, 3), (2, 196, 196)]:
        assert out[h, i, j] == table[idx[i, j], h]
    out.sum().backward()
    counts = torch.bincount(idx.reshape(-1), minlength=732).float()
    assert torch.equal(rpb.relative_position_bias_table.grad, counts[:, None].expand(732, 12))
    rpb2 = RelativePositionBias((3, 4), num_heads=2, init_std=0.02)
    assert rpb2().shape == (2, 13, 13) and rpb2.relative_position_bias_table.abs().max() <= 0.04 + 1e-7
    assert RelativePositionBias((3, 4), 2, with_cls_token=False)().shape == (2, 12, 12)
    assert "relative_position_index" not in rpb.state_dict()


# ------------------------------------------------------------------------------------------------------------
# module


def _manual_msa(m, x, bias):
    """Plain PyTorch BEiT/DINO self-attention with the module's parameters (float64 oracle)."""
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads
    if m.q_bias is not None:
        b = torch.cat([m.q_bias, torch.zeros_like(m.q_bias), m.v_bias])
    else:
        b = m.qkv.bias
    qkv = x @ m.qkv.weight.t() + (b if b is not None else 0)
    q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) * m.scale
    if bias is not None:
        s = s + bias
    attn = s.softmax(-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return y @ m.proj.weight.t() + m.proj.bias, attn


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=interpreter)])
@pytest.mark.parametrize("bias_mode", ["qv", "qkv"])
def test_multihead_self_attention_matches_manual(device, backend, bias_mode):
    B, wh, ww, H, C = 2, 3, 4, 2, 64
    N = wh * ww + 1
    m = MultiheadSelfAttention(C, H, qkv_bias=bias_mode == "qkv", qv_bias=bias_mode == "qv").to(device)
    rpb = RelativePositionBias((wh, ww), H, init_std=0.02).to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(B, N, C, device=device, requires_grad=True)
    with use_backend(backend, op="attention"):
        y = m(x, rpb())
    params = [x] + list(m.parameters()) + list(rpb.parameters())
    grads = torch.autograd.grad(y, params, torch.ones_like(y))

    m64 = MultiheadSelfAttention(C, H, qkv_bias=bias_mode == "qkv", qv_bias=bias_mode == "qv").to(device).double()
    m64.load_state_dict(m.state_dict())
    rpb64 = RelativePositionBias((wh, ww), H).to(device).double()
    rpb64.load_state_dict(rpb.state_dict())
    x64 = x.detach().double().requires_grad_()
    y64, attn64 = _manual_msa(m64, x64, rpb64())
    params64 = [x64] + list(m64.parameters()) + list(rpb64.parameters())
    grads64 = torch.autograd.grad(y64, params64, torch.ones_like(y64))
    assert_close(y, y64, atol=1e-4, rtol=1e-4, name="y")
    for i, (g, r) in enumerate(zip(grads, grads64)):
        assert_close(g, r, atol=1e-4, rtol=1e-4, name=f"grad[{i}]")
    if bias_mode == "qv":
        assert m.q_bias.grad is None and grads[2].abs().sum() > 0  # q_bias is trained

    y2, attn = m(x, rpb(), return_attention=True)
    assert attn.shape == (B, H, N, N)
    assert_close(attn, attn64, atol=1e-5, rtol=1e-5, name="attn")
    assert_close(y2, y64, atol=1e-4, rtol=1e-4, name="y(return_attention)")


def test_multihead_self_attention_api_errors_and_dropout():
    with pytest.raises(ValueError, match="exclusive"):
        MultiheadSelfAttention(64, 2, qkv_bias=True, qv_bias=True)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSelfAttention(65, 2)
    m = MultiheadSelfAttention(64, 4, attn_drop=0.5)
    x = torch.randn(2, 7, 64)
    with pytest.raises(ValueError, match=r"x must be \[B, N, 64\]"):
        m(x[..., :32])
    m.eval()
    ref = m(x)
    m.train()
    torch.manual_seed(1)
    dropped = m(x)
    assert dropped.shape == ref.shape and not torch.allclose(dropped, ref)
    m.eval()
    assert torch.equal(m(x), ref)
    assert kernels.attention is attention


# ------------------------------------------------------------------------------------------------------------
# GPU code path without a GPU: compile every kernel ahead of time for sm_80 and sm_90


@pytest.mark.slow
def test_triton_kernels_compile_for_gpu_targets():
    """Forward and backward kernels as the JIT builds them at the ViT-B shape (bf16, shared bias; IEEE fp32
    forward), for sm_90 (+ the sm_80 backward tiles): no spills, shared memory within limits, wgmma where the
    tiles allow it. Every config and shape: ``python -m bench.static_gpu_check --ops attention``."""
    from _aot import run_static

    results = run_static("attention")
    assert len(results) == 6
    for r in results:  # the bf16 dots run on tensor cores: wgmma on sm_90, mma.sync on sm_80; IEEE fp32: FMA
        assert r["found"] == r["expect"], (r["kernel"], r["case"], r["sm"], r["found"], r["expect"])


@interpreter
def test_triton_inference_path_without_grad(device, poisoned_alloc):
    """Under no_grad (or with no input requiring grad) the forward runs without an autograd node."""
    B, H, N, d = 1, 2, 37, 64
    q, k, v, bias = _fresh(B, H, N, N, d, torch.float16, device, "batch")
    ref = attention_reference(q.double(), k.double(), v.double(), bias.double())
    with torch.no_grad(), use_backend("triton", op="attention"):
        out = attention(q, k, v, bias)
    assert out.grad_fn is None and out.dtype == torch.float16
    assert_close(out, ref, dtype=torch.float16, atol=2e-3, rtol=2e-3, name="out")
    with use_backend("triton", op="attention"):
        out2 = attention(q.detach(), k.detach(), v.detach(), bias.detach())
    assert out2.grad_fn is None and torch.equal(out, out2)
