"""Input validation shared by the masked ops: clear TypeError/ValueError naming the argument.

Checks that would need a device->host copy on CUDA (mask counts, target range) run only when the data
is on the CPU (free) or when ``KERNELS_DEBUG=1`` is set; see :func:`host_checks_enabled`.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def debug_enabled() -> bool:
    return os.environ.get("KERNELS_DEBUG", "0") not in ("", "0")


def host_checks_enabled(t: torch.Tensor) -> bool:
    """Data-dependent checks run on CPU tensors (no sync to pay) or everywhere under KERNELS_DEBUG=1;
    never while ``torch.compile`` traces (they would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or debug_enabled()


def check_tensor(name: str, t, *, ndim=None, dtypes=None, optional=False):
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
                f"{name}: expected {' or '.join(f'{d}-D' for d in allowed)} tensor, "
                f"got shape {tuple(t.shape)}"
            )
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_mask(mask, shape, name="mask"):
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype bool, got {str(mask.dtype).replace('torch.', '')}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (the leading dims of the input), got {tuple(mask.shape)}"
        )


def check_vector(name: str, t, D: int):
    """A [D] parameter; [1, D] and [1, 1, D] (timm layouts) are accepted too."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES)
    if t.shape[-1:] != (D,) or t.numel() != D:
        raise ValueError(f"{name}: expected shape ({D},) (D of x), got {tuple(t.shape)}")


def check_same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")
