"""Shared test harness (the --device rule is the root conftest.py's): seeding, per-dtype tolerances, assert_close, poisoning."""

import pytest
import torch

# atol, rtol against a float64 reference, per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "timm: needs the real timm (+ torchvision); run by .ci/compat.sh in its venv")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--device").startswith("cuda"):
        skip = pytest.mark.skip(reason="needs --device cuda")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tolerance(dtype):
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, atol=None, rtol=None, name="tensor"):
    """torch.testing-style closeness with the worst element's index and values in the message."""
    dtype = dtype or actual.dtype
    d_atol, d_rtol = TOLERANCES.get(dtype, (0.0, 0.0))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        bad = (~torch.isfinite(a)) & torch.isfinite(e)
        assert not bad.any(), f"{name}: non-finite values at {bad.nonzero()[:5].tolist()}"
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        count = int((excess > 0).sum())
        raise AssertionError(
            f"{name}: {count}/{a.numel()} elements differ beyond atol={atol}, rtol={rtol}; worst at {idx}: "
            f"actual={a[idx].item():.6g} expected={e[idx].item():.6g} |diff|={abs(a[idx] - e[idx]).item():.3g}"
        )


def poison(t):
    """Fill an output buffer with NaN (floats) or a sentinel (ints) so unwritten elements fail."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**30) if t.dtype != torch.bool else True)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer the native/Triton launchers allocate (``kernels._buffers.empty``) starts NaN (or a
    sentinel), so unwritten elements fail. Kernel test files apply it with
    ``pytestmark = pytest.mark.usefixtures("poison_outputs")``."""

    def alloc(shape, dtype, device):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr("kernels._buffers.empty", alloc)


def losses_on_fixed_batch(model, batch, lr, steps):
    """The loss before each of ``steps`` AdamW steps of ``model`` (a method: ``model(batch)["loss"]``) on one
    fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
