"""Registry of pre-training methods.

``@register("name")`` on a :class:`PretrainMethod` subclass makes it buildable by name. Known names are
looked up lazily by importing ``engine.methods.<name>``, so a method only needs its own module
(beit.py, beitv2.py, spark.py plug in the same way as simmim.py and dino.py).
"""

from __future__ import annotations

import importlib

from engine.methods.base import PretrainMethod

KNOWN_METHODS = ("beit", "beitv2", "simmim", "spark", "dino", "dvae", "vqkd")
_REGISTRY: dict[str, type[PretrainMethod]] = {}
_NOT_PRETRAINING: set[str] = set()


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


def _try_import(name: str) -> None:
    if name in _REGISTRY:
        return
    module = f"engine.methods.{name}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise


def available_methods() -> list[str]:
    """Names of the pre-training methods whose implementation can be imported (the same list whatever
    else the process has imported)."""
    for name in KNOWN_METHODS:
        _try_import(name)
    return sorted(n for n in _REGISTRY if n not in _NOT_PRETRAINING)


def get_method(name: str) -> type[PretrainMethod]:
    _try_import(name)
    if name not in _REGISTRY:
        have = ", ".join(available_methods()) or "none"
        if name in KNOWN_METHODS:
            raise UnknownMethodError(f"method {name!r} is not implemented yet; available: {have}")
        raise UnknownMethodError(f"unknown method {name!r}; available: {have}")
    return _REGISTRY[name]


def build_method(name: str, cfg: dict) -> PretrainMethod:
    return get_method(name)(cfg)


__all__ = ["KNOWN_METHODS", "PretrainMethod", "UnknownMethodError", "available_methods", "build_method",
           "get_method", "register"]
