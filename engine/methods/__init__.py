"""Registry of pre-training methods.

``@register("name")`` on a :class:`PretrainMethod` subclass makes it buildable by name, from any module. A
built-in method is a module of this package, imported on demand: ``get_method("x")`` imports
``engine.methods.x``, and the lists (:func:`available_methods`, :func:`registered_methods`) import every module
of the package first -- so a new method is one file here (or one ``@register`` anywhere) and nothing else: its
defaults, options, data recipe and masks are declared by its class (:mod:`engine.methods.base`).
"""

from __future__ import annotations

import importlib
import pkgutil

from engine.methods.base import PretrainMethod

_REGISTRY: dict[str, type[PretrainMethod]] = {}
_NOT_PRETRAINING: set[str] = set()


def _builtin_modules() -> tuple[str, ...]:
    """The modules of this package (candidate built-in methods), by name."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


KNOWN_METHODS = _builtin_modules()  # modules of this package; the methods are those that register


class UnknownMethodError(ValueError):
    pass


def register(name: str, *, pretraining: bool = True):
    """Register a method under ``name``; ``pretraining=False`` (fine-tuning) keeps it out of the
    pre-training list that ``python -m engine.pretrain`` offers."""
    def deco(cls: type[PretrainMethod]) -> type[PretrainMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        if not pretraining:
            _NOT_PRETRAINING.add(name)
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove a registered method (a test's own, say); unknown names are ignored."""
    _REGISTRY.pop(name, None)
    _NOT_PRETRAINING.discard(name)


def _try_import(name: str) -> None:
    if name in _REGISTRY:
        return
    module = f"engine.methods.{name}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise


def registered_methods() -> list[type[PretrainMethod]]:
    """Every registered method class, the built-ins imported first: pre-training methods by name, then the
    others (fine-tuning) by name."""
    for name in KNOWN_METHODS:
        _try_import(name)
    return [_REGISTRY[n] for n in sorted(_REGISTRY, key=lambda n: (n in _NOT_PRETRAINING, n))]


def available_methods() -> list[str]:
    """Names of the pre-training methods whose implementation can be imported (the same list whatever
    else the process has imported)."""
    return [cls.name for cls in registered_methods() if cls.name not in _NOT_PRETRAINING]


def get_method(name: str) -> type[PretrainMethod]:
    _try_import(name)
    if name not in _REGISTRY:
        have = ", ".join(available_methods()) or "none"
        raise UnknownMethodError(f"unknown method {name!r}; available: {have}")
    return _REGISTRY[name]


def build_method(name: str, cfg: dict) -> PretrainMethod:
    return get_method(name)(cfg)


__all__ = ["KNOWN_METHODS", "PretrainMethod", "UnknownMethodError", "available_methods", "build_method",
           "get_method", "register", "registered_methods", "unregister"]
