"""The one way an op is defined: a ``torch.library`` custom op whose autograd formula is written once.

Every differentiable op ``<name>`` in ``kernels/<family>/<name>.py`` is laid out top-down as::

    validate(*args) -> <Name>Inputs        frozen dataclass: checked, normalised arguments (kernels._checks)
    OP = define_op("<name>")                backends and their not_supported_reasons(inputs) (kernels._backend)
    _forward(...)  / _backward_kernels(...) plain functions: pick the backend, call its launcher
    _setup_context(ctx, inputs, output)     what the backward needs (and which backend ran)
    _grads(bwd, ctx, *grads)                the autograd formula, once: the kernel backward through ``bwd``,
                                            or autograd over ``reference.py`` when the reference ran
    fwd_op = custom_op("<name>_fwd", _forward) ; bwd_op = custom_op("<name>_bwd", _backward_kernels)
    register_fake / register_autograd(partial(_grads, bwd_op), setup_context=_setup_context)
    _Eager = eager_function(...)            the same _forward/_setup_context/_grads as a plain
                                            ``autograd.Function`` (custom-op dispatch costs ~20 us a call
                                            in eager mode; bench/test_bench_dispatch.py measures it)
    <name>(*args)                           validate, then: compiling -> fwd_op; eager kernel -> _Eager;
                                            eager reference -> reference.py directly (plain autograd)

so eager and compiled calls run the same forward, the same backward and the same autograd formula; only the
wrapper differs. The reference backward is never written by hand: it is autograd over ``reference.py``
(recomputed inside ``_grads`` with :func:`reference_grads` when a compiled graph or a direct
``torch.ops.ssl_kernels.<name>_fwd`` call ran the reference backend).

Importing this module imports neither triton nor the extension and never initialises CUDA.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NAMESPACE = "ssl_kernels"


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def custom_op(name: str, fn: Callable, mutates_args: Sequence[str] = ()):
    """Register ``fn`` (annotated: the schema is inferred) as ``ssl_kernels::<name>``; ``fn`` itself is
    left as it is, so the eager path can call it without the custom-op dispatch."""
    return torch.library.custom_op(qualname(name), mutates_args=tuple(mutates_args))(fn)


def nothing(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 0-element placeholder a custom op returns for a gradient that was not requested (op schemas
    cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """A ``torch.autograd.Function`` subclass running ``forward`` / ``setup_context`` / ``backward``: the
    functions a custom op registers, without its dispatch cost. ``backward(ctx, *grads)`` returns one
    gradient (or None) per forward input.

    The class uses the ``forward(ctx, *args)`` form and calls ``setup_context`` itself: a Function that
    declares ``setup_context`` has its arguments bound with ``inspect.Signature.bind`` on every call (10-25 us
    in eager mode, the largest part of an op call at small shapes)."""

    def forward_with_ctx(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx),
        "backward": staticmethod(torch.autograd.function.once_differentiable(backward)),
        "__doc__": f"Eager autograd wrapper of the {name} custom op (same forward, setup and backward).",
    })


def reference_grads(reference: Callable, inputs: Sequence, needs: Sequence[bool], grads: Sequence, **kwargs):
    """Gradients of ``reference(*inputs, **kwargs)`` by autograd: one per input (None where not needed or
    not a floating tensor). The reference backward of every op comes from here, never a hand copy."""
    leaves = []
    for x, need in zip(inputs, needs):
        if need and isinstance(x, torch.Tensor) and x.is_floating_point():
            leaves.append(x.detach().requires_grad_())
        else:
            leaves.append(x.detach() if isinstance(x, torch.Tensor) else x)
    wanted = [leaf for leaf, need in zip(leaves, needs) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if not wanted:
        return tuple(None for _ in inputs)
    with torch.enable_grad():
        out = reference(*leaves, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and isinstance(o, torch.Tensor)
                 and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    result = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            g = next(it)
            result.append(torch.zeros_like(leaf) if g is None else g)
        else:
            result.append(None)
    return tuple(result)
