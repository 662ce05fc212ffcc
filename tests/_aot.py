"""Ahead-of-time GPU compiles without a GPU: the shared runner of the per-op AOT tests.

:func:`run_static` runs ``python -m bench.static_gpu_check --subset ci`` for some ops in a fresh interpreter
(``TRITON_INTERPRET=0``, repository root): each kernel is compiled for sm_90 (the attention backward also for
sm_80) with the arguments its launcher passes at the real shapes, specialised by the JIT's own binder (ints
equal to 1 as constants, ints/pointers divisible by 16 with ``tt.divisibility``), then checked for shared
memory, register spills (``ptxas -v``) and tensor-core instructions in the SASS (``cuobjdump``). The full
sweep -- every autotune config, every layer shape, sm_80 -- is ``python -m bench.static_gpu_check`` (minutes;
report in ``bench/results/static-sm90.md``).

:func:`run_aot` (a script after :data:`PRELUDE`, with :func:`check_resources`) stays for ad-hoc compiles.
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


def run_static(ops: str, timeout: int = 900) -> list[dict]:
    """Compile the ``--subset ci`` cases of ``ops`` (comma-separated) with bench/static_gpu_check.py; skip
    when Triton's NVIDIA backend or its bundled ptxas is missing; fail on any failing case (compile error,
    shared memory over the limit, spills in a fixed launch config). Returns the per-case results."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("triton")
    if spec is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    if not (pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled ptxas is missing")
    root = pathlib.Path(__file__).resolve().parents[1]
    jobs = str(min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "bench.static_gpu_check", "--ops", ops, "--subset", "ci", "--no-report",
           "--json", "-", "--jobs", jobs]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                         env=dict(os.environ, TRITON_INTERPRET="0"), check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout)
    failing = [f"sm_{r['sm']} {r['kernel']} {r['case']}: {'; '.join(r['why'])}" for r in results
               if r["status"] == "FAIL"]
    assert not failing, "\n".join(failing)
    return results
