"""Backend dispatch by declared capability.

Every op registers up to three implementations, tried in this order:

    native     kernels._C (C++ on CPU, CUDA on GPU)      aliases: cuda, cpp
    triton     Triton kernels (CUDA tensors; CPU only under TRITON_INTERPRET=1 when forced)
    reference  pure PyTorch, always importable; the oracle in tests and the CPU fallback

Each implementation declares ``not_supported_reasons(*args, **kwargs) -> list[str]``; the first backend
whose list is empty runs. ``KERNELS_BACKEND=<name>`` forces one backend for every op and
``KERNELS_BACKEND_<OP>=<name>`` (op name upper-cased) for one op; :func:`use_backend` does the same
inside a ``with`` block. A forced backend that cannot take the inputs raises :class:`NotSupportedError`
listing its reasons; it never silently falls back.

Importing this module imports neither triton nor the extension and never initialises CUDA.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("native", "triton", "reference")
ALIASES = {"cuda": "native", "cpp": "native", "c++": "native", "torch": "reference"}
ENV_VAR = "KERNELS_BACKEND"
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"

_override: contextvars.ContextVar[dict[str | None, str]] = contextvars.ContextVar("kernels_backend", default={})
_forced_now: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels_forced", default=None)


class NotSupportedError(RuntimeError):
    """No backend (or not the forced one) can run an op on the given inputs."""


class NativeUnavailableError(ImportError):
    """kernels._C is missing or failed to import."""


def canonical(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)} (aliases: {ALIASES})")
    return key


def forced_backend(op_name: str) -> str | None:
    """The backend forced for ``op_name`` by :func:`use_backend` or the environment, else None."""
    override = _override.get()
    if op_name in override:
        return override[op_name]
    if None in override:
        return override[None]
    value = os.environ.get(f"{ENV_VAR}_{op_name.upper()}") or os.environ.get(ENV_VAR)
    return canonical(value) if value else None


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Force ``name`` for ``op`` (or for every op when ``op`` is None) inside the block."""
    current = dict(_override.get())
    current[op] = canonical(name)
    token = _override.set(current)
    try:
        yield
    finally:
        _override.reset(token)


# ----------------------------------------------------------------------------------------------------------
# capability helpers shared by the ops


_native_module = None
_native_error: str | None = None


def native():
    """Return the compiled ``kernels._C`` module, or raise with the command that builds it."""
    global _native_module, _native_error
    if _native_module is not None:
        return _native_module
    if _native_error is None:
        try:
            _native_module = importlib.import_module("kernels._C")
            return _native_module
        except ImportError as exc:
            _native_error = f"kernels._C is not available ({exc}); {BUILD_HINT}"
    raise NativeUnavailableError(_native_error)


def native_threads() -> int:
    """The OpenMP thread count handed to the C++ kernels: torch's intra-op thread count (at least 1)."""
    return max(1, torch.get_num_threads())


def native_reasons() -> list[str]:
    try:
        native()
    except NativeUnavailableError as exc:
        return [str(exc)]
    return []


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Looked up once: ``find_spec`` walks sys.path (tens of microseconds), and dispatch asks on every call."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Reasons Triton cannot run on these tensors.

    CUDA tensors are fine. CPU tensors are accepted only when Triton is forced *and*
    ``TRITON_INTERPRET=1`` was set before triton was imported (the tests do this).
    """
    if not triton_installed():
        return ["triton is not installed (pip install triton>=3.6)"]
    devices = {t.device.type for t in tensors if t is not None}
    if devices <= {"cuda"}:
        return []
    if _forced_now.get() == "triton" and interpreter_enabled() and devices <= {"cpu", "cuda"}:
        return []
    return [
        f"inputs are on {sorted(devices)}; Triton runs on CUDA tensors "
        "(on CPU only with TRITON_INTERPRET=1 and KERNELS_BACKEND=triton)"
    ]


def same_device_reasons(**tensors: torch.Tensor | None) -> list[str]:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        return ["tensors are on different devices: " + ", ".join(f"{n}={d}" for n, d in devices.items())]
    return []


def launches_on_input_device(fn: Callable) -> Callable:
    """Decorator for Triton launchers: launch on the CUDA device of the first tensor argument.

    Triton launches on the *current* CUDA device and its current stream, whatever device the pointers live
    on; a tensor on ``cuda:1`` while ``cuda:0`` is current would fault. CPU tensors (the interpreter) pass
    through untouched.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if a.device.type == "cuda":
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------------------
# ops


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    reasons: Callable[..., list[str]]
    note: str = ""


class Op:
    """A named operation with per-backend implementations chosen by declared capability."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.impls: dict[str, Implementation] = {}

    def register(self, backend: str, not_supported_reasons: Callable[..., list[str]] | None = None, note: str = ""):
        """Decorator: ``@op.register("triton", reasons_fn)`` registers ``fn`` for ``backend``."""
        backend = canonical(backend)

        def deco(fn: Callable) -> Callable:
            reasons = not_supported_reasons or (lambda *a, **k: [])
            self.impls[backend] = Implementation(self.name, backend, fn, reasons, note)
            return fn

        return deco

    def not_supported_reasons(self, backend: str, *args, **kwargs) -> list[str]:
        return self._reasons(canonical(backend), forced_backend(self.name), args, kwargs)

    def _reasons(self, backend: str, forced: str | None, args, kwargs) -> list[str]:
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{self.name} has no {backend} implementation"]
        token = _forced_now.set(forced)
        try:
            return list(impl.reasons(*args, **kwargs))
        finally:
            _forced_now.reset(token)

    def select(self, *args, **kwargs) -> Implementation:
        pinned = _pinned.get()
        if pinned is not None and pinned.op == self.name:
            return pinned
        forced = forced_backend(self.name)
        order = (forced,) if forced else BACKENDS
        why: dict[str, list[str]] = {}
        for backend in order:
            reasons = self._reasons(backend, forced, args, kwargs)
            if not reasons:
                return self.impls[backend]
            why[backend] = reasons
        lines = "\n".join(f"  {b}: " + "; ".join(r) for b, r in why.items())
        head = f"backend {forced!r} was forced for {self.name} but" if forced else f"no backend of {self.name}"
        raise NotSupportedError(f"{head} cannot run these inputs:\n{lines}")

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs).fn(*args, **kwargs)

    def pinned(self, impl: Implementation) -> "_Pin":
        """``with op.pinned(impl):`` -- inside the block :meth:`select` returns ``impl`` without asking again: the
        public function selected once, and the eager wrapper's forward and setup must not pay for it twice."""
        return _Pin(impl)

    def describe(self) -> dict[str, str]:
        return {b: (self.impls[b].note or "yes") if b in self.impls else "-" for b in BACKENDS}


_pinned: contextvars.ContextVar[Implementation | None] = contextvars.ContextVar("kernels_pinned", default=None)


class _Pin:
    __slots__ = ("impl", "token")

    def __init__(self, impl: Implementation):
        self.impl = impl

    def __enter__(self):
        self.token = _pinned.set(self.impl)

    def __exit__(self, *exc):
        _pinned.reset(self.token)


REGISTRY: dict[str, Op] = {}


def define_op(name: str, doc: str = "") -> Op:
    if name in REGISTRY:
        raise ValueError(f"op {name!r} is already defined")
    op = Op(name, doc)
    REGISTRY[name] = op
    return op
