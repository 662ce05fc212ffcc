"""One device rule for ``tests/`` and ``bench/``: the ``--device`` option.

``--device auto`` (the default) is ``cuda`` when a CUDA device is visible, else ``cpu``; ``--device cpu`` or
``--device cuda[:i]`` choose. The Triton interpreter (``TRITON_INTERPRET=1``, which must be set before triton
is first imported) is on exactly when the resolved device is the CPU, so Triton kernels run (slowly, at
small shapes) on a CPU-only machine and natively on a GPU. ``BENCH_DRY_RUN=1`` (the GPU plan rehearsed on
the CPU) resolves to ``cpu``. An explicit ``TRITON_INTERPRET`` in the environment is left as it is.
Nothing imports triton before :func:`pytest_configure` runs: the conftests import only torch and pytest.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import pytest

def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def pytest_addoption(parser):
    parser.addoption("--device", default="auto",
                     help="device of the tests and of the benches' CUDA cases: auto (default: cuda when "
                          "available, else cpu), cpu, cuda or cuda:<i>")


def resolve_device(value: str) -> str:
    if _flag("BENCH_DRY_RUN"):
        return "cpu"
    if value == "auto":
        import torch  # is_available() asks the driver; it does not create a CUDA context

        return "cuda" if torch.cuda.is_available() else "cpu"
    if value != "cpu" and not value.startswith("cuda"):
        raise pytest.UsageError(f"--device {value}: expected auto, cpu, cuda or cuda:<i>")
    return value


def _kernels_source_hash() -> str:
    root = pathlib.Path(__file__).parent / "kernels"
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(root.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def pytest_configure(config):
    """Resolve ``--device`` once; afterwards ``config.getoption("--device")`` is ``cpu``, ``cuda`` or
    ``cuda:<i>`` everywhere (tests/conftest.py's ``device`` fixture reads it).

    Inductor's on-disk caches are keyed per source state of ``kernels/``: torch's AOT-autograd cache does not
    see the Python autograd formula of a custom op, so a graph compiled before an edit of that formula would
    be reused with the old backward (measured: a stale backward graph calling ``attention_bwd``)."""
    device = resolve_device(config.getoption("--device"))
    config.option.device = device
    os.environ.setdefault("TRITON_INTERPRET", "1" if device == "cpu" else "0")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_ssl_{_kernels_source_hash()}"))
