"""Ahead-of-time GPU compiles without a GPU: the shared runner of the per-op AOT tests.

Each op's test holds a script that builds its kernels' signatures and calls ``triton.compile`` for an
NVIDIA target; :func:`run_aot` runs it in a fresh interpreter (``TRITON_INTERPRET=0``, repository root) after
:data:`PRELUDE`, which provides the imports and :func:`check_resources`: shared memory within the per-block
limit of the target and, where asked, no register spills (``ptxas -v``).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

PRELUDE = r'''
import os, pathlib, re, subprocess, tempfile
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMEM_LIMIT = {80: 166912, 90: 232448}  # max shared memory per block (bytes, opt-in): A100, H100
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def check_resources(ck, what, sm=90, spills=False):
    """Shared memory of the compiled kernel ``ck`` within the sm's limit; with ``spills``, no register spills."""
    assert ck.metadata.shared <= SMEM_LIMIT[sm], (what, sm, ck.metadata.shared)
    if spills:
        d = tempfile.mkdtemp()
        pathlib.Path(d, "k.ptx").write_text(ck.asm["ptx"])
        arch = "sm_90a" if sm == 90 else f"sm_{sm}"
        info = subprocess.run([str(PTXAS), "-v", f"-arch={arch}", os.path.join(d, "k.ptx"), "-o",
                               os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
        spill = int(re.search(r"(\d+) bytes spill stores", info).group(1))
        assert spill == 0, (what, info)
'''


def run_aot(script: str, timeout: int = 600) -> str:
    """Run ``PRELUDE + script``; skip when Triton's NVIDIA backend or its bundled ptxas is missing; return stdout."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    if not (pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled ptxas is missing")
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PRELUDE + script], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, TRITON_INTERPRET="0"), cwd=root, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout
