"""``python -m kernels.info``: what this installation can run, and why not where it cannot.

Prints the environment (torch, triton, CUDA, the native extension and how it was built) and, for every
registered op, which backends it has and whether each can run here on a small probe of the current
device. Importing the module costs nothing; ``collect()`` does the work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform

import torch

import kernels  # noqa: F401  (registers every op)
from kernels import _backend


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": None,
        "triton_interpret": _backend.interpreter_enabled(),
        "native": None,
        "forced_backend": _backend.forced_backend("*"),
    }
    if _backend.triton_installed():
        env["triton"] = importlib.import_module("triton").__version__
    try:
        env["native"] = dict(_backend.native().build_info)
    except _backend.NativeUnavailableError as exc:
        env["native"] = f"unavailable: {exc}"
    if env["cuda_available"]:
        env["device"] = torch.cuda.get_device_name()
    return env


def support_table() -> list[dict]:
    """One row per op: declared backends (with their notes)."""
    return [{"op": name, **op.describe(), "doc": op.doc} for name, op in sorted(_backend.REGISTRY.items())]


def render_markdown(rows: list[dict]) -> str:
    lines = ["| op | " + " | ".join(_backend.BACKENDS) + " | what |", "|---|" + "---|" * len(_backend.BACKENDS) + "---|"]
    for r in rows:
        lines.append(f"| `{r['op']}` | " + " | ".join(r[b] for b in _backend.BACKENDS) + f" | {r['doc']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--markdown", action="store_true", help="print only the support table as markdown (README)")
    args = p.parse_args(argv)
    env, rows = environment(), support_table()
    if args.json:
        print(json.dumps({"environment": env, "ops": rows}, indent=2, default=str))
    elif args.markdown:
        print(render_markdown(rows))
    else:
        for k, v in env.items():
            print(f"{k:>18}: {v}")
        print()
        print(render_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
