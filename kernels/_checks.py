"""Input checks, dtype tables and accumulation types shared by every op.

Every public op validates its arguments here before dispatch, so a bad call gets one ``TypeError`` or
``ValueError`` naming the argument and what was expected, never an error from inside a kernel.

Checks that read tensor *values* (mask counts, target ranges, finiteness) need a device-to-host copy on
CUDA. They run when :func:`host_checks_enabled` says so: CPU tensors (free), or any device under
``KERNELS_DEBUG=1``; never while ``torch.compile`` traces and never on meta tensors.

Importing this module imports neither triton nor the extension and never initialises CUDA.
"""

from __future__ import annotations

import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Every op takes these (float64 runs the reference maths in double, for tests)."""
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the tensor-core Triton kernels (attention, window attention) take."""
NATIVE_DTYPES = (torch.float32, torch.float64)
"""The dtypes the C++ CPU kernels take."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32: the accumulation type of every kernel here."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def debug_enabled() -> bool:
    return os.environ.get("KERNELS_DEBUG", "0") not in ("", "0")


def host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks may run: eager mode on a tensor with values (not while compiling, not on meta)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def host_checks_enabled(t: torch.Tensor) -> bool:
    """Value checks that cost a host sync on CUDA run: on CPU tensors, or everywhere under KERNELS_DEBUG=1
    (and never while compiling or on meta tensors)."""
    return host_checks_allowed(t) and (t.device.type == "cpu" or debug_enabled())


def check_tensor(name: str, t, *, ndim=None, dtypes=None, optional: bool = False) -> None:
    """``t`` is a tensor (or None when ``optional``) with ``ndim`` (an int or a tuple) dims and a dtype in
    ``dtypes``."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{name}: expected {' or '.join(f'{d}-D' for d in allowed)} tensor, got shape {tuple(t.shape)}"
            )
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {dtype_name(t.dtype)}")


def check_mask(mask, shape, name: str = "mask") -> None:
    """A bool tensor of exactly ``shape``."""
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype bool, got {dtype_name(mask.dtype)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the leading dims of the input), got {tuple(mask.shape)}")


def check_vector(name: str, t, D: int) -> None:
    """A [D] float parameter; [1, D] and [1, 1, D] (timm layouts) are accepted too."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES)
    if t.shape[-1:] != (D,) or t.numel() != D:
        raise ValueError(f"{name}: expected shape ({D},) (D of x), got {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")


def check_real(name: str, value, lo=None, hi=None, lo_open: bool = False) -> float:
    """A Python real number (not bool, not NaN) within [lo, hi] ((lo, hi] with ``lo_open``); returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    below = (v <= lo if lo_open else v < lo) if lo is not None else False
    if v != v or below or (hi is not None and v > hi):
        if lo is None and hi is None:
            want = "be a number"
        elif hi is None:
            want = "be " + (f"> {lo:g}" if lo_open else f">= {lo:g}")
        else:
            want = f"lie in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must {want} (not NaN), got {value}")
    return v


def check_int(name: str, value, lo=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def check_finite_tensor(name: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); expected finite values")
