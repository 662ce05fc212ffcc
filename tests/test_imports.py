import subprocess
import sys

import pytest

from kernels import _backend


def test_import_initialises_no_cuda():
    code = (
        "import sys, torch, kernels, engine\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised by import'\n"
        "assert 'triton' not in sys.modules, 'triton was imported eagerly'\n"
        "assert 'kernels._C' not in sys.modules, 'the extension was loaded eagerly'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_forced_backend_env_and_context(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    assert _backend.forced_backend("x") == "native"
    monkeypatch.setenv("KERNELS_BACKEND_X", "reference")
    assert _backend.forced_backend("x") == "reference"
    with _backend.use_backend("triton", op="x"):
        assert _backend.forced_backend("x") == "triton"
    assert _backend.forced_backend("x") == "reference"
    monkeypatch.setenv("KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        _backend.forced_backend("y")


def test_dispatch_order_and_reasons():
    op = _backend.Op("demo_op")
    op.register("native", lambda x: ["not built here"])(lambda x: "native")
    op.register("triton", lambda x: [] if x > 0 else ["x must be positive"])(lambda x: "triton")
    op.register("reference")(lambda x: "reference")
    assert op(1) == "triton"
    assert op(-1) == "reference"
    with _backend.use_backend("native", op="demo_op"):
        with pytest.raises(_backend.NotSupportedError, match=r"(?s)forced.*native: not built here"):
            op(1)
    only = _backend.Op("demo_only")
    only.register("triton", lambda x: ["no"])(lambda x: x)
    with pytest.raises(_backend.NotSupportedError) as info:
        only(0)
    msg = str(info.value)
    assert "native: demo_only has no native implementation" in msg and "triton: no" in msg


def test_triton_reasons_on_cpu_need_forcing(monkeypatch):
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t = torch.zeros(2)
    op = _backend.Op("demo_triton")
    op.register("triton", lambda x: _backend.triton_reasons(x))(lambda x: "triton")
    op.register("reference")(lambda x: "reference")
    assert op(t) == "reference"  # CPU default is the reference
    with _backend.use_backend("triton"):
        assert op(t) == "triton"
