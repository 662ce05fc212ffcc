"""Masked-image-modelling ops: ours vs the eager anchor (BEiT/timm style) vs torch.compile of the reference.

GPU shape (BEiT ViT-B/16 pre-training): B=256, N=196 patches (+1 cls), D=768, k=75 masked per row, V=8192,
bf16 (tiny under the GPU plan's dry run). CPU shape: B=8, N=49, D=64, k=20, V=512, fp32 (on CPU ``ours``
dispatches to the reference path, so the CPU rows only check the harness and the dispatch overhead).

Providers: ``ours`` (kernels.*, the Triton backend forced on the GPU cases -- the default there anyway),
``reference`` (the pure-PyTorch oracle: ``torch.where``/``cat``/``+pos``, boolean-free argsort gather,
full-logits fp32 cross-entropy), ``compile`` (``torch.compile`` of the reference; CUDA only) and, for the
cross-entropy, ``three-gemms``: its own GEMMs at the same shapes and dtype, nothing else (the forward's
``z = h_m W^T + b``; for fwd+bwd also ``dz W`` and ``dz^T h_m``, M = B*k rows) -- the floor the issue's
"within 1.1x of its three bare GEMMs" target compares with.

bytes_moved is the minimal traffic the op must do (reads of its inputs once, writes of its outputs once):
    scatter  fwd  x at the B*(N-k) unmasked rows only (masked rows are never read) + mask + out B*(N+1)*D
                  + the D-vectors / pos table once;
             fwd+bwd  + grad_out B*(N+1)*D read + grad_x B*N*D written + mask + fp32 parameter grads
    gather   fwd  2 * B*k*D (+ mask);           fwd+bwd  + B*k*D read + B*N*D grad_h written
    CE       h_masked + W (+ grad_h + grad_W writes for fwd+bwd)
flops: CE 2*M*V*D forward (loss only), 6*M*V*D forward+backward; the others are memory-bound (None).
extra_info ``peak_memory_bytes`` (CUDA): allocator peak above the inputs during one call.
"""

import pytest
import torch

import kernels
from bench.conftest import COMPILE, GPU, peak_memory, sized
from kernels.masked.reference import (
    gather_masked_reference,
    masked_cross_entropy_reference,
    masked_token_scatter_reference,
)

GPU_CASE = {**sized({"B": 256, "N": 196, "D": 768, "k": 75, "V": 8192}, {"B": 2, "N": 16, "D": 32, "k": 6, "V": 64}),
            "dtype": "bfloat16", "device": str(GPU), "gpu": True}
CPU = {"B": 8, "N": 49, "D": 64, "k": 20, "V": 512, "dtype": "float32", "device": "cpu"}

CASES = [
    pytest.param(GPU_CASE, marks=[pytest.mark.cuda, pytest.mark.headline], id="beit-vitb-bf16"),
    pytest.param(CPU, id="cpu-small-fp32"),
]
PROVIDERS = ["ours", "reference", COMPILE]


def _shape(c):
    return f"B{c['B']} N{c['N']} D{c['D']} k{c['k']}" + (f" V{c['V']}" if "V" in c else "")


def _mask(B, N, k, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    return (torch.rand(B, N, generator=g).argsort(dim=1) < k).to(device)


def _provider_fn(provider, ours, ref, device, kernel, gpu_case):
    if provider == "ours":
        if not gpu_case:
            return ours

        def forced(*args, **kwargs):  # the Triton path (CUDA's default; the interpreter under the dry run)
            with kernels.use_backend("triton", op=kernel):
                return ours(*args, **kwargs)

        return forced
    if provider == "reference":
        return ref
    if device.type != "cuda":
        pytest.skip("torch.compile provider is benchmarked on CUDA only")
    return torch.compile(ref)


def _grad_call(fn, inputs, *args, **kwargs):
    """fn(...) then autograd.grad w.r.t. ``inputs`` with a fixed upstream gradient (no .grad accumulation)."""
    cache = {}

    def run():
        out = fn(*args, **kwargs)
        if "g" not in cache:
            cache["g"] = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
        return torch.autograd.grad(out, inputs, cache["g"])

    return run


def _run(bench, case, provider, kernel, phase, ours, ref, inputs, args, kwargs, bytes_moved, flops=None):
    device = torch.device(case["device"])
    fn = _provider_fn(provider, ours, ref, device, kernel, case.get("gpu", False))
    if phase == "fwd":

        def call():
            with torch.no_grad():
                return fn(*args, **kwargs)
    else:
        call = _grad_call(fn, inputs, *args, **kwargs)
    call()  # warm up (compile, autotune, allocator)
    peak = peak_memory(call, device)
    reference = (
        (_grad_call(ref, inputs, *args, **kwargs) if phase != "fwd" else (lambda: ref(*args, **kwargs)))
        if provider != "reference"
        else None
    )
    if reference is not None and phase == "fwd":
        inner = reference

        def reference():
            with torch.no_grad():
                return inner()

    bench(
        call,
        kernel=kernel,
        provider=provider,
        shape=_shape(case) + f" {phase}",
        dtype=getattr(torch, case["dtype"]),
        device=device,
        reference=reference,
        bytes_moved=bytes_moved,
        flops=flops,
        peak_memory_bytes=peak,
        backend=_backend_of(kernel, provider, case, args, kwargs),
    )


def _backend_of(kernel, provider, case, args, kwargs):
    if provider != "ours":
        return None
    if case.get("gpu"):
        return "triton"
    return kernels.REGISTRY[kernel].select(*args, **kwargs).backend


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_bench_masked_token_scatter(bench, case, provider, phase):
    B, N, D, k, dt, dev = (
        case["B"],
        case["N"],
        case["D"],
        case["k"],
        getattr(torch, case["dtype"]),
        case["device"],
    )
    x = torch.randn(B, N, D, dtype=dt, device=dev, requires_grad=True)
    mask = _mask(B, N, k, dev)
    tok = torch.randn(D, device=dev, requires_grad=True)
    pos = torch.randn(N + 1, D, device=dev, requires_grad=True)
    cls = torch.randn(D, device=dev, requires_grad=True)
    e = x.element_size()
    params = (3 * D + (N + 1) * D) * 4  # mask token, cls token, pos table (fp32), read once
    fwd_bytes = B * (N - k) * D * e + B * N + B * (N + 1) * D * e + params  # masked rows of x are never read
    bwd_bytes = B * (N + 1) * D * e + B * N * D * e + B * N + params  # grad_out read, grad_x written, param grads
    nbytes = fwd_bytes if phase == "fwd" else fwd_bytes + bwd_bytes
    _run(
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
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_bench_gather_masked(bench, case, provider, phase):
    B, N, D, k, dt, dev = (
        case["B"],
        case["N"],
        case["D"],
        case["k"],
        getattr(torch, case["dtype"]),
        case["device"],
    )
    full = torch.randn(B, N + 1, D, dtype=dt, device=dev, requires_grad=True)
    h = full[:, 1:]  # encoder output without the cls row: a strided view, as in the trainer
    mask = _mask(B, N, k, dev)
    e = full.element_size()
    nbytes = 2 * B * k * D * e + B * N if phase == "fwd" else 3 * B * k * D * e + B * N * D * e + 2 * B * N
    _run(
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
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", PROVIDERS + ["three-gemms"])
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_bench_masked_cross_entropy(bench, case, provider, phase):
    B, N, D, k, V, dev = (case[n] for n in ("B", "N", "D", "k", "V", "device"))
    dt = getattr(torch, case["dtype"])
    if provider == "three-gemms":
        _three_gemms(bench, case, phase, B * k, D, V, dt, dev)
        return
    h = torch.randn(B, N, D, dtype=dt, device=dev, requires_grad=True)
    w = (torch.randn(V, D, device=dev) * 0.02).to(dt).requires_grad_(True)
    b = torch.zeros(V, dtype=dt, device=dev, requires_grad=True)
    targets = torch.randint(0, V, (B, N), device=dev)
    mask = _mask(B, N, k, dev)
    M, e = B * k, h.element_size()
    fwd_bytes = (M * D + V * D + V) * e
    nbytes = fwd_bytes if phase == "fwd" else fwd_bytes + (B * N * D + V * D + V) * e
    flops = 2 * M * V * D if phase == "fwd" else 6 * M * V * D
    _run(
        bench,
        case,
        provider,
        "masked_cross_entropy",
        phase,
        kernels.masked_cross_entropy,
        masked_cross_entropy_reference,
        [h, w, b],
        (h, w, b, targets, mask),
        {"num_masked": k},
        nbytes,
        flops,
    )


def _three_gemms(bench, case, phase, M, D, V, dt, dev):
    """The floor of masked CE: its GEMMs alone, same shapes and dtype (cuBLAS; no gather, no softmax)."""
    hm = torch.randn(M, D, dtype=dt, device=dev)
    w = (torch.randn(V, D, device=dev) * 0.02).to(dt)
    b = torch.zeros(V, dtype=dt, device=dev)

    def fwd():
        return torch.addmm(b, hm, w.t())  # z = h_m W^T + b

    def fwd_bwd():
        z = torch.addmm(b, hm, w.t())
        return z @ w, z.t() @ hm  # grad_h = dz W, grad_W = dz^T h_m (dz has z's shape and dtype)

    with torch.no_grad():
        fn = fwd if phase == "fwd" else fwd_bwd
        fn()
    e = hm.element_size()
    bench(fn, kernel="masked_cross_entropy", provider="three-gemms", shape=_shape(case) + f" {phase}", dtype=dt,
          device=torch.device(dev), flops=2 * M * V * D * (1 if phase == "fwd" else 3),
          bytes_moved=(M * D + V * D + M * V) * e * (1 if phase == "fwd" else 3),
          note="its own GEMMs at the same shapes and dtype only (z = h_m W^T + b; + dz W, dz^T h_m for fwd+bwd)")
