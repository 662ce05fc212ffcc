"""Shared harness of the masked-image-modelling bench files (bench/test_bench_masked_token_scatter.py,
test_bench_gather_masked.py, test_bench_masked_cross_entropy.py): cases, providers, one timed call.

GPU shape (BEiT ViT-B/16 pre-training): B=256, N=196 patches (+1 cls), D=768, k=75 masked per row, V=8192,
bf16 (tiny under the GPU plan's dry run). CPU shape: B=8, N=49, D=64, k=20, V=512, fp32 (on CPU ``ours``
dispatches to the reference path, so the CPU rows only check the harness and the dispatch overhead).

Providers: ``ours`` (kernels.*, the Triton backend forced on the GPU cases -- the default there anyway),
``reference`` (the pure-PyTorch oracle in kernels/masked/reference.py) and ``compile`` (``torch.compile`` of
the reference; CUDA only). extra_info ``peak_memory_bytes`` (CUDA): allocator peak above the inputs during
one call.
"""

import pytest
import torch

import kernels
from bench.conftest import COMPILE, GPU, peak_memory, sized

GPU_CASE = {**sized({"B": 256, "N": 196, "D": 768, "k": 75, "V": 8192}, {"B": 2, "N": 16, "D": 32, "k": 6, "V": 64}),
            "dtype": "bfloat16", "device": str(GPU), "gpu": True}
CPU = {"B": 8, "N": 49, "D": 64, "k": 20, "V": 512, "dtype": "float32", "device": "cpu"}

CASES = [
    pytest.param(GPU_CASE, marks=[pytest.mark.cuda, pytest.mark.headline], id="beit-vitb-bf16"),
    pytest.param(CPU, id="cpu-small-fp32"),
]
PROVIDERS = ["ours", "reference", COMPILE]


def shape_label(c):
    return f"B{c['B']} N{c['N']} D{c['D']} k{c['k']}" + (f" V{c['V']}" if "V" in c else "")


def case_shape(c):
    """(B, N, D, k, dtype, device) of a case."""
    return c["B"], c["N"], c["D"], c["k"], getattr(torch, c["dtype"]), c["device"]


def make_mask(B, N, k, device):
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


def run_case(bench, case, provider, kernel, phase, ours, ref, inputs, args, kwargs, bytes_moved, flops=None,
             *, validate):
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
        shape=shape_label(case) + f" {phase}",
        dtype=getattr(torch, case["dtype"]),
        device=device,
        reference=reference,
        bytes_moved=bytes_moved,
        flops=flops,
        peak_memory_bytes=peak,
        backend=_backend_of(kernel, provider, case, validate(*args, **kwargs)),
    )


def _backend_of(kernel, provider, case, inputs):
    """The backend ``ours`` ran: the op's dispatch on its checked inputs object (``validate(...)``)."""
    if provider != "ours":
        return None
    if case.get("gpu"):
        return "triton"
    return kernels.REGISTRY[kernel].select(inputs).backend
