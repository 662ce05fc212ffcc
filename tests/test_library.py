"""torch.library registrations (kernels.library): opcheck, values vs the eager ops, torch.compile fullgraph.

opcheck runs the schema, fake-tensor, autograd-registration and AOT-dispatch checks of every custom op.
The values are compared with the eager functional APIs (whose own tests compare them with the float64
references). Compiled graphs use the ``aot_eager`` backend (Dynamo + fake implementations + AOTAutograd
through ``register_autograd``; seconds on CPU); one test runs Inductor and is marked ``slow``.
"""

import pytest
import torch
from conftest import assert_close
from torch._dynamo.testing import CompileCounterWithBackend

import kernels
from kernels import library

DTYPES = (torch.float32, torch.float64)


def _leaf(t):
    return t.detach().requires_grad_()


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _close_all(actual, expected, dtype, names):
    for a, e, n in zip(actual, expected, names):
        if e is None:
            assert a is None or not a.any(), n
            continue
        assert_close(a, e, dtype=dtype, name=n)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_every_public_op_is_registered():
    ops = library.registered_ops()
    assert set(ops) == {"attention", "masked_token_scatter", "gather_masked", "masked_cross_entropy",
                        "nearest_code", "ema_codebook_update", "sparse_conv2d", "window_attention"}
    for names in ops.values():
        for qual in names:
            ns, name = qual.split("::")
            packet = getattr(getattr(torch.ops, ns), name)
            assert packet.default._schema.name == qual
    # the forward ops that have a backward are differentiable through register_autograd
    q = torch.randn(1, 1, 3, 2, requires_grad=True)
    assert library.op("attention_fwd")(q, q, q, None, 1.0, False)[0].grad_fn is not None


# ----------------------------------------------------------------------------------------------------------
# attention


def _qkv(B, H, Nq, Nk, d, dtype):
    # q, k, v as strided views of one [B, N, 3, H, d] projection, the way every ViT produces them
    qkv = torch.randn(B, max(Nq, Nk), 3, H, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    return _leaf(qkv[0][:, :, :Nq]), _leaf(qkv[1][:, :, :Nk]), _leaf(qkv[2][:, :, :Nk])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [None, "hqk", "1hqk", "bhqk", "b1qk"])
def test_attention_op_matches_eager_and_opcheck(dtype, bias_shape):
    B, H, Nq, Nk, d = 2, 3, 5, 7, 6
    q, k, v = _qkv(B, H, Nq, Nk, d, dtype)
    shapes = {"hqk": (H, Nq, Nk), "1hqk": (1, H, Nq, Nk), "bhqk": (B, H, Nq, Nk), "b1qk": (B, 1, Nq, Nk)}
    bias = None if bias_shape is None else _leaf(torch.randn(shapes[bias_shape], dtype=dtype))
    inputs = [t for t in (q, k, v, bias) if t is not None]
    out = library.op("attention_fwd")(q, k, v, bias, 0.37, False)[0]
    ref = kernels.attention(q, k, v, bias, scale=0.37)
    assert_close(out, ref, dtype=dtype, name="out")
    assert out.transpose(1, 2).is_contiguous(), "output must be [B, Nq, H, d]-contiguous (free head merge)"
    g = torch.randn_like(out)
    _close_all(_grads(out, inputs, g), _grads(ref, inputs, g), dtype, ["dq", "dk", "dv", "dbias"])
    torch.library.opcheck(library.op("attention_fwd"), (q, k, v, bias, 0.37, False))


def test_attention_lse_is_log2_sum_exp():
    q, k, v = _qkv(2, 2, 4, 5, 3, torch.float64)
    bias = torch.randn(2, 4, 5, dtype=torch.float64)
    _, lse2 = library.op("attention_fwd")(q, k, v, bias, 0.5, False)
    s = torch.matmul(q, k.transpose(-2, -1)) * 0.5 + bias
    assert lse2.dtype == torch.float32
    assert_close(lse2, torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64)),
                 dtype=torch.float32, name="lse2")


# ----------------------------------------------------------------------------------------------------------
# masked ops


def _mask_k(B, N, k):
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N)[:k]] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["cls+pos(N+1)", "cls+pos(N)", "cls", "pos(N)", "none"])
def test_masked_token_scatter_op(dtype, variant):
    B, N, D = 3, 7, 5
    x = _leaf(torch.randn(B, N, D + 2, dtype=dtype)[..., 1:-1])  # non-contiguous
    mask = torch.rand(B, N) < 0.5
    tok = _leaf(torch.randn(1, 1, D, dtype=dtype))
    cls = _leaf(torch.randn(1, 1, D, dtype=dtype)) if "cls" in variant else None
    rows = N + 1 if "N+1" in variant else N
    pos = _leaf(torch.randn(1, rows, D, dtype=dtype)) if "pos" in variant else None
    inputs = [t for t in (x, tok, pos, cls) if t is not None]
    args = (x, mask, tok.reshape(D), None if pos is None else pos.reshape(-1, D), None if cls is None else cls.reshape(D))
    out = library.op("masked_token_scatter_fwd")(*args)
    ref = kernels.masked_token_scatter(x, mask, tok, pos, cls)
    assert_close(out, ref, dtype=dtype, name="out")
    g = torch.randn_like(out)
    _close_all(_grads(out, inputs, g), _grads(ref, inputs, g), dtype, ["gx", "gtok", "gpos", "gcls"])
    torch.library.opcheck(library.op("masked_token_scatter_fwd"), args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_masked", [3, None])
def test_gather_masked_op(dtype, num_masked):
    B, N, D = 3, 7, 5
    h = _leaf(torch.randn(B, N + 1, D, dtype=dtype)[:, 1:])  # skip a cls row: non-contiguous
    mask = _mask_k(B, N, 3) if num_masked else torch.rand(B, N) < 0.5
    args = (h, mask, -1 if num_masked is None else num_masked)
    out = library.op("gather_masked_fwd")(*args)
    ref = kernels.gather_masked(h, mask, num_masked)
    assert_close(out, ref, dtype=dtype, name="out")
    g = torch.randn_like(out)
    assert_close(_grads(out, [h], g)[0], _grads(ref, [h], g)[0], dtype=dtype, name="gh")
    torch.library.opcheck(library.op("gather_masked_fwd"), args)


def test_gather_masked_short_row_gets_nan_and_no_gradient_leak():
    h = _leaf(torch.randn(2, 5, 3, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)  # row 1 holds 1 < k = 2
    out = library.op("gather_masked_fwd")(h, mask, 2)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[:3]).all()
    (gh,) = torch.autograd.grad(out, h, torch.ones_like(out))
    expected = mask.unsqueeze(-1).expand_as(h).to(torch.float64)
    assert torch.equal(gh, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("num_masked", [4, None])
def test_masked_cross_entropy_op(dtype, with_bias, num_masked):
    B, N, D, V = 3, 9, 6, 11
    h = _leaf(torch.randn(B, N, D, dtype=dtype))
    w = _leaf(torch.randn(V, D, dtype=dtype))
    b = _leaf(torch.randn(V, dtype=dtype)) if with_bias else None
    mask = _mask_k(B, N, 4)
    t = torch.randint(0, V, (B, N))
    t[0, mask[0].nonzero()[0, 0]] = -100  # one ignored masked row
    inputs = [x for x in (h, w, b) if x is not None]
    fwd = library.op("masked_cross_entropy_fwd")
    if num_masked is None:  # as when compiled: every row, the unmasked ones ignored (static shapes)
        h_rows, t_rows = h.reshape(-1, D), torch.where(mask, t, -100).reshape(-1)
    else:
        h_rows, t_rows = library.op("gather_masked_fwd")(h, mask, num_masked), t[mask]
    loss, acc, *_ = fwd(h_rows, w, b, t_rows, -100, dtype, 0, True, True, with_bias)
    rloss, racc = kernels.masked_cross_entropy(h, w, b, t, mask, return_accuracy=True, num_masked=num_masked)
    assert_close(loss, rloss.to(loss.dtype), dtype=dtype, name="loss")
    assert_close(acc, racc.to(acc.dtype), dtype=dtype, name="accuracy")
    _close_all(_grads(loss, inputs, None), _grads(rloss, inputs, None), dtype, ["gh", "gw", "gb"])
    h2 = _leaf(h.detach()[mask])
    torch.library.opcheck(fwd, (h2, w, b, t[mask], -100, dtype, 0, True, True, with_bias))
    torch.library.opcheck(fwd, (h2, w, b, t[mask], -100, dtype, 5, True, False, False))


def test_masked_cross_entropy_op_all_rows_ignored_is_zero():
    h = _leaf(torch.randn(4, 3, dtype=torch.float64))
    w = _leaf(torch.randn(5, 3, dtype=torch.float64))
    t = torch.full((4,), -100)
    loss = library.op("masked_cross_entropy_fwd")(h, w, None, t, -100, torch.float64, 0, True, True, False)[0]
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert not gh.any() and not gw.any()


# ----------------------------------------------------------------------------------------------------------
# codebook


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_nearest_code_op(dtype, normalize):
    z = _leaf(torch.randn(3, 7, 6, dtype=dtype))
    z.data[0, 0] = 0.0  # a zero row: the eps branch of the normalisation gradient
    cb = torch.nn.functional.normalize(torch.randn(13, 6, dtype=dtype), dim=-1)
    args = (z.reshape(-1, 6), cb, normalize, 1e-12, "auto")
    zq, idx, sim = library.op("nearest_code_fwd")(*args)  # the custom-op path, with its registered autograd
    ref = kernels.nearest_code(z, cb, normalize)  # the eager path
    assert torch.equal(idx, ref.indices.reshape(-1))
    assert_close(zq, ref.z_q.reshape(-1, 6), dtype=dtype, name="z_q")
    assert_close(sim, ref.similarity.reshape(-1), dtype=dtype, name="similarity")
    g = torch.randn_like(zq)
    assert_close(_grads(zq, [z], g)[0], _grads(ref.z_q, [z], g.reshape(ref.z_q.shape))[0], dtype=dtype, name="dz")
    torch.library.opcheck(library.op("nearest_code_fwd"), args)


@pytest.mark.parametrize("normalize", [True, False])
def test_ema_ops_mutate_like_the_eager_update(normalize):
    K, d = 7, 4
    z = torch.randn(20, d, dtype=torch.float64)
    state = [torch.nn.functional.normalize(torch.randn(K, d, dtype=torch.float64), dim=-1),
             torch.rand(K, dtype=torch.float64), torch.zeros(K, d, dtype=torch.float64),
             torch.zeros(K, dtype=torch.int64)]
    idx = kernels.nearest_code(z, state[0]).indices
    idx[idx == 2] = 3  # code 2 unused: its row must stay bit-exact
    eager = [t.clone() for t in state]
    kernels.ema_codebook_update(eager[0], eager[1], eager[2], z, idx, decay=0.8, normalize=normalize,
                                steps_since_used=eager[3])
    cb, cs, es, steps = [t.clone() for t in state]
    counts = torch.empty(K, dtype=torch.float64)
    library.op("codebook_ema_scatter")(z, idx, es, counts, normalize, 1e-5)
    library.op("codebook_ema_finalize")(cb, cs, counts, es, 0.8, 1e-5, normalize, steps)
    for a, e, n in zip((cb, cs, es, steps), eager, ("codebook", "cluster_size", "embed_sum", "steps")):
        assert torch.equal(a, e), n
    assert torch.equal(cb[2], state[0][2])
    fresh = [t.clone() for t in state]
    scatter, finalize = library.op("codebook_ema_scatter"), library.op("codebook_ema_finalize")
    torch.library.opcheck(scatter, (z, idx, fresh[2], counts.clone(), normalize, 1e-5))
    torch.library.opcheck(finalize, (fresh[0], fresh[1], counts, es, 0.8, 1e-5, normalize, fresh[3]))
    torch.library.opcheck(finalize, (fresh[0], fresh[1], counts, es, 0.8, 1e-5, normalize, None))


# ----------------------------------------------------------------------------------------------------------
# sparse conv


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("conf", [{"stride": 1, "padding": 1, "groups": 1}, {"stride": 2, "padding": 1, "groups": 1},
                                  {"stride": 1, "padding": 1, "groups": 4}])
def test_sparse_conv2d_op(backend, conf):
    dtype = torch.float64
    B, C, H, W = 2, 4, 7, 9
    cout = 4 if conf["groups"] > 1 else 5
    x = _leaf(torch.randn(B, C, H, W, dtype=dtype))
    active = torch.rand(B, H, W) < 0.6
    w = _leaf(torch.randn(cout, C // conf["groups"], 3, 3, dtype=dtype))
    b = _leaf(torch.randn(cout, dtype=dtype))
    assert library.sparse_conv2d is kernels.sparse_conv2d
    ref, a_out = kernels.sparse_conv2d(x, active, w, b, **conf)  # eager
    with kernels.use_backend(backend, op="sparse_conv2d"):
        fwd_args = (x, active, a_out, w, b, [conf["stride"]] * 2, [1, 1], [1, 1], conf["groups"])
        out = library.op("sparse_conv2d_fwd")(*fwd_args)  # the custom op, through its register_autograd
        g = torch.randn_like(out)
        grads = _grads(out, (x, w, b), g)
        torch.library.opcheck(library.op("sparse_conv2d_fwd"), fwd_args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype=dtype, name="out")
    _close_all(grads, _grads(ref, (x, w, b), g), dtype, ["dx", "dw", "db"])


# ----------------------------------------------------------------------------------------------------------
# the Triton branches of the ops (interpreter on CPU)


@pytest.mark.interpreter
def test_registered_ops_run_the_triton_backend():
    dtype = torch.float32
    q, k, v = _qkv(1, 2, 5, 6, 4, dtype)
    bias = _leaf(torch.randn(2, 5, 6, dtype=dtype))
    h = _leaf(torch.randn(2, 6, 8, dtype=dtype))
    mask = _mask_k(2, 6, 2)
    tok = _leaf(torch.randn(8, dtype=dtype))
    z = _leaf(torch.randn(5, 8, dtype=dtype))
    cb = torch.nn.functional.normalize(torch.randn(6, 8, dtype=dtype), dim=-1)
    w = _leaf(torch.randn(7, 8, dtype=dtype))
    t = torch.randint(0, 7, (2, 6))
    cases = {
        "masked_cross_entropy": (lambda: library.masked_cross_entropy(h, w, None, t, mask, num_masked=2),
                                 lambda: kernels.masked_cross_entropy(h, w, None, t, mask, num_masked=2), (h, w)),
        "attention": (lambda: library.op("attention_fwd")(q, k, v, bias, 4 ** -0.5, False)[0],
                      lambda: kernels.attention(q, k, v, bias), (q, k, v, bias)),
        "masked_token_scatter": (lambda: library.masked_token_scatter(h, mask, tok),
                                 lambda: kernels.masked_token_scatter(h, mask, tok), (h, tok)),
        "gather_masked": (lambda: library.gather_masked(h, mask, 2), lambda: kernels.gather_masked(h, mask, 2), (h,)),
        "nearest_code": (lambda: library.op("nearest_code_fwd")(z, cb, True, 1e-12, "auto")[0],
                         lambda: kernels.nearest_code(z, cb).z_q, (z,)),
    }
    for name, (ours, eager, inputs) in cases.items():
        ref = eager()
        g = torch.randn_like(ref)
        ref_grads = _grads(ref, inputs, g)
        with kernels.use_backend("triton", op=name):
            out = ours()
            grads = _grads(out, inputs, g)
        assert_close(out, ref, dtype=dtype, atol=1e-4, rtol=1e-4, name=f"{name} out")
        for a, e in zip(grads, ref_grads):
            assert_close(a, e, dtype=dtype, atol=1e-4, rtol=1e-4, name=f"{name} grad")


# ----------------------------------------------------------------------------------------------------------
# torch.compile


def _ssl_nodes(counter):
    return {str(n.target).split(".")[1] for g in counter.graphs for n in g.graph.nodes if "ssl_kernels" in str(n.target)}


class TinyBeit(torch.nn.Module):
    """Masked embedding -> attention with rel-pos bias -> masked LM head: three kernels, one graph."""

    def __init__(self, grid=3, dim=8, heads=2, vocab=13):
        super().__init__()
        self.emb = kernels.MaskedTokenEmbedding(grid * grid, dim, cls_token=True, pos_embed=True)
        self.attn = kernels.MultiheadSelfAttention(dim, heads, qv_bias=True)
        self.rel_pos = kernels.RelativePositionBias((grid, grid), heads, init_std=0.02)
        self.head = kernels.MaskedLMHead(dim, vocab)

    def forward(self, x, mask, targets, num_masked):
        h = self.emb(x, mask)
        h = h + self.attn(h, self.rel_pos())
        return self.head(h[:, 1:], targets, mask=mask, num_masked=num_masked)


def _tiny_beit_inputs(num_masked):
    x = torch.randn(2, 9, 8)
    mask = _mask_k(2, 9, 4)
    return x, mask, torch.randint(0, 13, (2, 9)), num_masked


def _compare_compiled(model, inputs, backend):
    loss = model(*inputs)
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    closs = compiled(*inputs)
    closs.backward()
    assert_close(closs, loss, name="loss")
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5, name=f"grad {n}")
    return counter


@pytest.mark.parametrize("num_masked", [4, None])
def test_compile_fullgraph_masked_model(num_masked):
    counter = _compare_compiled(TinyBeit(), _tiny_beit_inputs(num_masked), "aot_eager")
    assert counter.frame_count == 1
    expected = {"masked_token_scatter_fwd", "attention_fwd", "masked_cross_entropy_fwd"}
    if num_masked is not None:
        expected.add("gather_masked_fwd")
    assert expected <= _ssl_nodes(counter)


def test_compile_fullgraph_vector_quantizer_training_step():
    vq = kernels.VectorQuantizer(num_codes=7, dim=4, kmeans_init=False, decay=0.9)
    twin = kernels.VectorQuantizer(num_codes=7, dim=4, kmeans_init=False, decay=0.9)
    twin.load_state_dict(vq.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    for _ in range(2):
        z = torch.randn(2, 5, 4, requires_grad=True)
        zq, idx, loss = vq(z)
        czq, cidx, closs = compiled(z)
        assert torch.equal(idx, cidx)
        assert_close(czq, zq, name="z_q")
        assert_close(closs, loss, name="loss")
        assert_close(torch.autograd.grad(czq.sum() + closs, z)[0], torch.autograd.grad(zq.sum() + loss, z)[0],
                     name="dz")
        for name in ("codebook", "cluster_size", "embed_sum", "steps_since_used"):
            assert torch.equal(getattr(twin, name), getattr(vq, name)), name
    assert counter.frame_count == 1
    assert {"nearest_code_fwd", "codebook_ema_scatter", "codebook_ema_finalize"} <= _ssl_nodes(counter)


def test_compile_fullgraph_sparse_conv():
    x = _leaf(torch.randn(2, 3, 8, 8))
    active = torch.rand(2, 8, 8) > 0.5
    w, b = _leaf(torch.randn(5, 3, 3, 3)), _leaf(torch.randn(5))

    def f(x, active, w, b):
        out, a = library.sparse_conv2d(x, active, w, b, stride=2, padding=1)
        out2, _ = library.sparse_conv2d(out, a, w[:, :3].contiguous().repeat(1, 2, 1, 1)[:, :5], None, padding=1)
        return (out2**2).mean()

    eager = f(x, active, w, b)
    counter = CompileCounterWithBackend("aot_eager")
    comp = torch.compile(f, fullgraph=True, backend=counter)(x, active, w, b)
    assert_close(comp, eager, name="loss")
    for a, e in zip(torch.autograd.grad(comp, (x, w, b)), torch.autograd.grad(eager, (x, w, b))):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name="grad")
    assert _ssl_nodes(counter) == {"sparse_conv2d_fwd"}


def test_compile_validation_errors_still_raise():
    q = torch.randn(2, 3, 5, 4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k):
        return kernels.attention(q, k, k)

    with pytest.raises(Exception, match="k must be"):
        f(q, torch.randn(2, 3, 5, 6))


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    counter = _compare_compiled(TinyBeit(), _tiny_beit_inputs(4), "inductor")
    assert counter.frame_count == 1


def test_library_wrappers_validate_like_the_functional_apis():
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match="k must be"):
        library.attention(q, torch.randn(2, 3, 5, 6), q)
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        library.masked_token_scatter(torch.randn(2, 3, 4), torch.zeros(2, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="num_masked=2 but row"):
        library.gather_masked(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="targets: expected values in"):
        library.masked_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        library.nearest_code(torch.full((2, 4), float("nan")), torch.randn(3, 4))
    with pytest.raises(TypeError, match="active: expected dtype bool"):
        library.sparse_conv2d(torch.randn(1, 2, 4, 4), torch.ones(1, 4, 4), torch.randn(3, 2, 3, 3))


def test_sparse_conv2d_functional_compiles_fullgraph():
    import kernels

    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    active = torch.rand(2, 9, 11) > 0.4
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, active, w):
        out, act = kernels.sparse_conv2d(x, active, w, padding=1)
        return out.square().sum()

    eager = f(x, active, w)
    (g_eager,) = torch.autograd.grad(eager, w)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, active, w)
    (g,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(g, g_eager)
