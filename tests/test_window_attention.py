"""kernels.window_attention: Swin window attention (relative position bias + shifted-window mask), fused.

Triton cases run under TRITON_INTERPRET=1 on CPU (small B*nW) and natively with --device cuda. Every
kernel output buffer is NaN-poisoned at allocation (``poisoned_alloc``), so an element a kernel fails to
write shows up as a NaN against the float64 oracle. The oracle is written here from timm's eager maths
(``attn + bias.unsqueeze(0)`` then ``attn.view(-1, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)``),
independently of :mod:`kernels.attn.reference`.
"""

import pytest
import torch
from conftest import assert_close, poison

from kernels import NotSupportedError, use_backend, window_attention
from kernels.attn.relative_position import relative_position_index
from kernels.attn.window_attention import OP as window_attention_op
from kernels.attn.window_attention import validate as window_attention_inputs

interpreter = pytest.mark.interpreter
NAMES = ("dq", "dk", "dv", "dbias")


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every buffer the launchers allocate (``kernels._buffers.empty``) starts NaN-filled (poisoned) during the
    test, so an element a kernel fails to write fails the comparison."""

    def alloc(shape, dtype, device):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr("kernels._buffers.empty", alloc)


def swin_shift_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """Swin's shifted-window mask for a ``grid x grid`` map: [nW, N, N], 0 within a region, -100 across."""
    img = torch.zeros(1, grid, grid, 1)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = img.view(1, grid // window, window, grid // window, window, 1).permute(0, 1, 3, 2, 4, 5)
    win = win.reshape(-1, window * window)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def timm_eager(q, k, v, bias, mask, scale):
    """timm / official SwinTransformer WindowAttention maths (eager, materialised scores)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nW, N = mask.shape[0], mask.shape[-1]
        attn = attn.view(-1, nW, q.shape[1], N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, q.shape[1], N, N)
    return attn.softmax(-1) @ v


def _leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def _oracle(q, k, v, bias, mask, grad, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, bias)]
    out = timm_eager(*c, None if mask is None else mask.double(), scale)
    return out, torch.autograd.grad(out, _leaves(*c), grad.double())


def _run(q, k, v, bias, mask, grad, backend, scale=None):
    with use_backend(backend, op="window_attention"):
        out = window_attention(q, k, v, bias, mask, scale)
    return out, torch.autograd.grad(out, _leaves(q, k, v, bias), grad)


def _inputs(B, nW, H, N, d, dtype, device, with_bias=True, with_mask=True, window=None):
    BW = B * nW
    qkv = torch.randn(BW, N, 3, H, d, dtype=dtype, device=device)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # Swin's views
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # Swin's fp32 table under autocast
    bias = (torch.randn(H, N, N, device=device, dtype=table_dtype) * 0.5).requires_grad_() if with_bias else None
    mask = None
    if with_mask:
        if window is not None:
            grid = window * int(round(nW ** 0.5))
            mask = swin_shift_mask(grid, window, window // 2).to(device, table_dtype)
        else:
            mask = torch.where(torch.rand(nW, N, N, device=device) < 0.3, -100.0, 0.0).to(table_dtype)
    return q, k, v, bias, mask


CASES = [
    # B, nW, H, N, d, bias, mask, window (None: random 0/-100 mask)
    (2, 4, 2, 49, 32, True, True, 7),     # Swin 7x7 windows, shifted block on a 14x14 map
    (1, 4, 2, 36, 32, True, True, 6),     # Swin 6x6 (SimMIM at 192 px)
    (2, 4, 2, 36, 32, True, False, None),  # non-shifted block
    (3, 2, 1, 16, 32, True, True, None),  # 4x4 windows, odd batch
    (2, 2, 2, 13, 16, True, True, None),  # odd N and head dim
    (1, 2, 2, 36, 32, False, True, None),  # mask without bias
    (1, 1, 1, 64, 64, True, False, None),  # the largest Triton tile (8x8 windows, d = 64)
]


@interpreter
@pytest.mark.parametrize("B,nW,H,N,d,with_bias,with_mask,window", CASES)
def test_triton_fp32_matches_float64(device, poisoned_alloc, B, nW, H, N, d, with_bias, with_mask, window):
    q, k, v, bias, mask = _inputs(B, nW, H, N, d, torch.float32, device, with_bias, with_mask, window)
    grad = torch.randn(B * nW, H, N, d, device=device)
    out, grads = _run(q, k, v, bias, mask, grad, "triton")
    ref, ref_grads = _oracle(q, k, v, bias, mask, grad)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous(), "output must be [B*nW, N, H, d]-contiguous (free head merge)"
    assert_close(out, ref, dtype=torch.float32, name="out")
    assert len(grads) == (4 if with_bias else 3)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)
    if with_bias:
        assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype


@pytest.mark.parametrize("B,nW,H,N,d,with_bias,with_mask,window", CASES[:5])
def test_reference_matches_timm_eager(B, nW, H, N, d, with_bias, with_mask, window):
    q, k, v, bias, mask = _inputs(B, nW, H, N, d, torch.float64, torch.device("cpu"), with_bias, with_mask, window)
    assert window_attention_op.select(window_attention_inputs(q, k, v, bias, mask, 0.25)).backend == "reference"  # the CPU default
    grad = torch.randn(B * nW, H, N, d, dtype=torch.float64)
    out, grads = _run(q, k, v, bias, mask, grad, "reference", scale=0.3)
    ref, ref_grads = _oracle(q, k, v, bias, mask, grad, scale=0.3)
    assert_close(out, ref, dtype=torch.float64, name="out")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float64, name=name)


def test_shift_mask_is_swins():
    m = swin_shift_mask(12, 6, 3)
    assert m.shape == (4, 36, 36)
    assert torch.count_nonzero(m[0]) == 0  # the top-left window lies in one region
    assert set(m.unique().tolist()) == {-100.0, 0.0} and torch.equal(m, m.transpose(1, 2))


def _max_err(a, r):
    return (a.detach().double() - r.detach().double()).abs().max().item()


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,nW,H,N,d,with_mask", [(1, 4, 2, 49, 32, True), (2, 2, 2, 36, 32, False)])
def test_triton_low_precision_within_2x_eager_error(device, poisoned_alloc, dtype, B, nW, H, N, d, with_mask):
    """Error vs float64 at most 2x that of eager PyTorch in the same dtype (+ one ulp of the magnitude); the
    float32 bias (gathered from a float32 table under autocast) gets its gradient in float32."""
    q, k, v, bias, mask = _inputs(B, nW, H, N, d, dtype, device, True, with_mask, 7 if N == 49 else None)
    grad = torch.randn(B * nW, H, N, d, device=device, dtype=dtype)
    out, grads = _run(q, k, v, bias, mask, grad, "triton")
    low, low_grads = _run(q, k, v, bias, mask, grad, "reference")
    ref, ref_grads = _oracle(q, k, v, bias, mask, grad)
    eps = torch.finfo(dtype).eps
    assert grads[3].dtype == torch.float32
    for name, ours, eager, r in zip(("out",) + NAMES, (out, *grads), (low, *low_grads), (ref, *ref_grads)):
        assert torch.isfinite(ours).all(), f"{name}: non-finite values"
        if name != "dbias":
            assert ours.dtype == dtype, name
        bound = 2.0 * _max_err(eager, r) + eps * r.abs().max().item()
        assert _max_err(ours, r) <= bound, f"{name}: error {_max_err(ours, r):.3g} > 2 x eager in {dtype}"


@interpreter
def test_non_contiguous_inputs(device, poisoned_alloc):
    """q/k/v of different layouts (one transposed copy), the permuted table gather as bias, a strided mask view
    and a strided grad_out."""
    B, nW, H, N, d = 2, 2, 2, 16, 32
    q = torch.randn(B * nW, H, N, d, device=device, requires_grad=True)
    k = torch.randn(B * nW, N, H, d, device=device).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(B * nW, H, d, N, device=device).transpose(2, 3).detach().requires_grad_()
    table = torch.randn(49, H, device=device, requires_grad=True)
    index = relative_position_index((4, 4), with_cls_token=False)
    bias = table[index.reshape(-1)].view(N, N, H).permute(2, 0, 1)
    assert not bias.is_contiguous()
    mask_store = torch.where(torch.rand(nW, N, 2 * N, device=device) < 0.3, -100.0, 0.0)
    mask = mask_store[:, :, ::2]
    grad = torch.randn(B * nW, N, H, d, device=device).transpose(1, 2)
    with use_backend("triton", op="window_attention"):
        out = window_attention(q, k, v, bias, mask)
    got = torch.autograd.grad(out, (q, k, v, table), grad)
    c = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = timm_eager(c[0], c[1], c[2], c[3][index.reshape(-1)].view(N, N, H).permute(2, 0, 1), mask.double(),
                     d ** -0.5)
    exp = torch.autograd.grad(ref, c, grad.double())
    assert_close(out, ref, dtype=torch.float32, name="out")
    for name, g, r in zip(("dq", "dk", "dv", "dtable"), got, exp):
        assert_close(g, r, dtype=torch.float32, name=name)


@interpreter
@pytest.mark.parametrize("plan", [(7, 1), (3, 3), (2, 4)])
def test_dbias_is_bitwise_reproducible_without_atomics(device, poisoned_alloc, monkeypatch, plan):
    """dbias: per-program partial sums over fixed row groups + one reduction, bitwise equal across runs and
    equal to the float64 sum over every window (the forward walks the same forced groups). 7 images (rows, groups): one group of 7, 3 + 3 + a short 1,
    2 + 2 + 2 + a short 1."""
    from kernels.attn import window_attention_triton as wt

    monkeypatch.setattr(wt, "image_groups", lambda n, per_group, sms, per_sm=None: plan)  # fwd and bwd
    q, k, v, bias, mask = _inputs(7, 1, 2, 16, 32, torch.float32, device, True, True)
    grad = torch.randn(7, 2, 16, 32, device=device)
    runs = [_run(q, k, v, bias, mask, grad, "triton")[1] for _ in range(2)]
    for a, b, name in zip(runs[0], runs[1], NAMES):
        assert torch.equal(a, b), f"{name} differs between two runs"
    _, ref_grads = _oracle(q, k, v, bias, mask, grad)
    for name, g, r in zip(NAMES, runs[0], ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)


@interpreter
def test_inference_path_and_minus_inf_mask(device, poisoned_alloc):
    """no_grad runs the forward kernel alone; a mask with -inf entries (rows keep a finite entry) works."""
    q, k, v, bias, _ = _inputs(2, 2, 2, 36, 32, torch.float16, device)
    mask = torch.zeros(2, 36, 36, device=device)
    mask[:, :, 5:30] = float("-inf")
    ref = timm_eager(q.double(), k.double(), v.double(), bias.double(), mask.double(), 32 ** -0.5)
    with torch.no_grad(), use_backend("triton", op="window_attention"):
        out = window_attention(q, k, v, bias, mask)
    assert out.grad_fn is None and out.dtype == torch.float16
    assert_close(out, ref, dtype=torch.float16, name="out")


def test_mask_gets_no_gradient_and_must_be_constant():
    q, k, v, bias, mask = _inputs(1, 2, 2, 16, 8, torch.float64, torch.device("cpu"))
    out = window_attention(q, k, v, bias, mask)
    assert not mask.requires_grad
    out.sum().backward()
    assert bias.grad is not None and bias.grad.shape == (2, 16, 16)
    with pytest.raises(ValueError, match=r"window_mask is a constant"):
        window_attention(q, k, v, bias, mask.clone().requires_grad_())


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(8, 2, 36, 32)
    bias = torch.randn(2, 36, 36)
    mask = torch.zeros(4, 36, 36)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B\*nW, H, N, d\]"):
        window_attention(q[0], q, q)
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        window_attention(q, q[:, :, :35], q)
    with pytest.raises(ValueError, match=r"v must have the shape of q"):
        window_attention(q, q, q[:, :1])
    with pytest.raises(ValueError, match=r"bias must be the relative position bias \[H, N, N\] = \[2, 36, 36\].*"
                                         r"got \(2, 49, 49\)"):
        window_attention(q, q, q, torch.randn(2, 49, 49))  # a 7x7 table for 6x6 windows
    with pytest.raises(ValueError, match=r"bias must be the relative position bias"):
        window_attention(q, q, q, torch.randn(3, 36, 36))
    with pytest.raises(ValueError, match=r"window_mask has nW = 3 windows, which does not divide the B\*nW = 8"):
        window_attention(q, q, q, bias, torch.zeros(3, 36, 36))
    with pytest.raises(ValueError, match=r"window_mask must be \[nW, N, N\] = \[nW, 36, 36\]"):
        window_attention(q, q, q, bias, torch.zeros(4, 49, 49))
    with pytest.raises(ValueError, match=r"window_mask must be"):
        window_attention(q, q, q, bias, mask[0])
    with pytest.raises(TypeError, match=r"window_mask: expected dtype in \(.*\), got bool"):
        window_attention(q, q, q, bias, mask.bool())
    with pytest.raises(TypeError, match=r"bias: expected dtype in \(.*\), got int64"):
        window_attention(q, q, q, bias.long())
    with pytest.raises(TypeError, match=r"share a dtype"):
        window_attention(q, q.half(), q)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(.*\), got int64"):
        window_attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match=r"k: expected a torch.Tensor, got None"):
        window_attention(q, None, q)
    with pytest.raises(TypeError, match=r"scale must be a real number, got Tensor"):
        window_attention(q, q, q, bias, mask, scale=torch.tensor(0.1))
    assert window_attention(q, q, q, bias, mask).shape == q.shape


@interpreter
def test_triton_refuses_what_it_cannot_run_with_reasons():
    q = torch.randn(2, 1, 81, 32)  # 9x9 windows
    with use_backend("triton", op="window_attention"):
        with pytest.raises(NotSupportedError, match=r"windows of 81 tokens are not supported"):
            window_attention(q, q, q)
        with pytest.raises(NotSupportedError, match=r"head dim 96 is not supported"):
            window_attention(*(torch.randn(2, 1, 16, 96),) * 3)
        with pytest.raises(NotSupportedError, match=r"float64 is not supported"):
            window_attention(*(torch.randn(2, 1, 16, 32, dtype=torch.float64),) * 3)
    assert window_attention(q, q, q).shape == q.shape  # unforced: the reference takes any N


def test_launchers_are_device_guarded():
    import importlib
    import inspect

    mod = importlib.import_module("kernels.attn.window_attention_triton")
    for name in ("window_attention_forward", "window_attention_backward"):
        fn = getattr(mod, name)
        assert hasattr(fn, "__wrapped__") and "](" in inspect.getsource(inspect.unwrap(fn)), name


# ------------------------------------------------------------------------------------------------------------
# torch.library custom ops


def test_custom_op_matches_eager_and_opcheck():
    from kernels import library

    assert library.registered_ops()["window_attention"] == ["ssl_kernels::window_attention_fwd",
                                                            "ssl_kernels::window_attention_bwd"]
    for with_bias, with_mask in ((True, True), (True, False), (False, True), (False, False)):
        q, k, v, bias, mask = _inputs(2, 2, 2, 9, 4, torch.float64, torch.device("cpu"), with_bias, with_mask)
        out = library.op("window_attention_fwd")(q, k, v, bias, mask, 0.37)
        ref = window_attention(q, k, v, bias, mask, scale=0.37)
        assert_close(out, ref, dtype=torch.float64, name="out")
        assert out.transpose(1, 2).is_contiguous()
        g = torch.randn_like(out)
        leaves = _leaves(q, k, v, bias)
        for a, e, n in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g), NAMES):
            assert_close(a, e, dtype=torch.float64, name=n)
        torch.library.opcheck(library.op("window_attention_fwd"), (q, k, v, bias, mask, 0.37))


@interpreter
def test_custom_op_runs_the_triton_backend():
    from kernels import library

    q, k, v, bias, mask = _inputs(2, 2, 2, 16, 16, torch.float32, torch.device("cpu"))
    grad = torch.randn(4, 2, 16, 16)
    with use_backend("triton", op="window_attention"):
        out = library.op("window_attention_fwd")(q, k, v, bias, mask, 16 ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v, bias), grad)
    ref, ref_grads = _oracle(q, k, v, bias, mask, grad)
    assert_close(out, ref, dtype=torch.float32, name="out")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name)


def test_compile_fullgraph_is_one_custom_op():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    q, k, v, bias, mask = _inputs(2, 2, 2, 9, 4, torch.float32, torch.device("cpu"))

    def step(q, k, v, bias):
        return window_attention(q, k, v, bias, mask).square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    loss = torch.compile(step, fullgraph=True, backend=counter)(q, k, v, bias)
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    ref_loss = step(q, k, v, bias)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, bias))
    assert counter.frame_count == 1
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert any("ssl_kernels.window_attention_fwd" in t for t in targets), targets
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, atol=1e-5, rtol=1e-5, name=name)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------
# launch plan and configs (pure functions), and the GPU code path without a GPU


def test_backward_image_groups_cover_every_window_row_once():
    """One program per (image group, window index, head): every image in exactly one group, the last group
    non-empty, ~4 programs per SM (Swin-B stages 1 and 4 on 132 SMs: 3 x 43 and 16 x 8 images)."""
    from kernels.attn import window_attention_triton as wt

    assert wt.image_groups(128, 64 * 4, 132) == (43, 3)
    assert wt.image_groups(128, 32, 132) == (8, 16)
    assert wt.image_groups(7, 2, None) == (4, 2)  # the interpreter: two groups (exercises the reduction)
    for n_img in (1, 2, 7, 128, 1000):
        for per_group, sms in ((1, 108), (4, 132), (256, 132), (4096, 132), (3, None)):
            rows, groups = wt.image_groups(n_img, per_group, sms)
            assert rows >= 1 and groups >= 1 and (groups - 1) * rows < n_img <= groups * rows, (n_img, per_group, sms)


def test_backward_precision_and_capability_pruning():
    """float32 64 x 64 backward tiles run IEEE dots even where TF32 is allowed (TF32 spills there); the sm_8x
    launch that spills (bf16/fp16, N > 32 and d > 32) is refused with a reason, never launched."""
    from kernels.attn import window_attention_triton as wt
    from kernels.attn.window_attention import capability_reasons

    wide, narrow = wt._blocks(49, 32), wt._blocks(25, 32)
    assert wt.backward_precision(torch.float32, wide, "tf32") == "ieee"
    assert wt.backward_precision(torch.float32, narrow, "tf32") == "tf32"
    assert wt.backward_precision(torch.float32, wide, "ieee") == "ieee"
    assert wt.backward_precision(torch.bfloat16, wide, "tf32") == "tf32"
    assert wt._options(wide, torch.bfloat16, backward=True)["num_warps"] == 8
    assert wt._options(wide, torch.float32, backward=False)["num_warps"] == 8
    assert wt._options(wt._blocks(64, 64), torch.float32, False, "ieee")["num_warps"] == 16
    assert wt._options(wt._blocks(64, 64), torch.float32, False, "tf32")["num_warps"] == 8
    assert wt._options(wide, torch.bfloat16, backward=False)["num_warps"] == 4
    assert wt._options(narrow, torch.float32, backward=True)["num_warps"] == 4
    assert capability_reasons(torch.bfloat16, 49, 32, (8, 0)) == []  # Swin's heads are 32 wide
    assert capability_reasons(torch.bfloat16, 64, 64, (9, 0)) == []
    assert capability_reasons(torch.float32, 64, 64, (8, 0)) == []
    assert capability_reasons(torch.float16, 32, 64, (8, 6)) == []
    (why,) = capability_reasons(torch.float16, 49, 64, (8, 0))
    assert "compute capability 8.0" in why and "spills" in why


@interpreter
def test_triton_fp32_tf32_allowed_matches_float64(device, poisoned_alloc):
    """Under matmul precision "high" the forward may use TF32 and the 64 x 64 backward runs IEEE dots
    (backward_precision): gradients vs float64 at Swin's 7x7 shape with the mask (on the GPU within TF32's
    error in the forward, IEEE-exact in the backward's dots)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        q, k, v, bias, mask = _inputs(2, 4, 2, 49, 32, torch.float32, device, True, True, 7)
        grad = torch.randn(8, 2, 49, 32, device=device)
        out, grads = _run(q, k, v, bias, mask, grad, "triton")
    finally:
        torch.set_float32_matmul_precision(old)
    ref, ref_grads = _oracle(q, k, v, bias, mask, grad)
    tf32 = dict(atol=2e-2, rtol=2e-2) if device.type == "cuda" else {}
    assert_close(out, ref, dtype=torch.float32, name="out", **tf32)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, dtype=torch.float32, name=name, **tf32)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """Both kernels as the JIT builds them at Swin-B stage 1 (224 px, 7x7 windows + mask; bf16 and float32
    under TF32, whose backward runs IEEE dots) for sm_90: no spills, shared memory within the limit, wgmma for
    the bf16 / TF32 dots, FMA for IEEE. Every stage, dtype, tile size and sm_80:
    ``python -m bench.static_gpu_check --ops window_attention``."""
    from _aot import run_static

    results = run_static("window_attention")
    assert len(results) == 4
    for r in results:
        assert r["spill_stores"] == 0 and r["found"] == r["expect"], (r["kernel"], r["case"], r)
