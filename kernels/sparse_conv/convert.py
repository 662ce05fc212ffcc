"""``to_sparse(model)``: swap the dense layers of a ResNet/ConvNeXt-style model for sparse ones in place.

Replaced (same parameter and buffer objects, so weights, optimiser state and running stats are kept):
``nn.Conv2d`` -> :class:`SparseConv2d` (groups 1 or depthwise, zero padding), ``nn.BatchNorm2d`` ->
:class:`SparseBatchNorm2d`, channels-first layer norms (a ``LayerNorm2d`` subclass of ``nn.LayerNorm``, or
a module with ``data_format == "channels_first"``, ``normalized_shape``, ``weight``, ``bias`` and ``eps``, as in
ConvNeXt) -> :class:`SparseLayerNorm`, ``nn.MaxPool2d``/``nn.AvgPool2d`` -> sparse pooling,
``nn.AdaptiveAvgPool2d(1)`` -> :class:`SparseAdaptiveAvgPool2d`. Every other leaf is left and reported with
the reason: per-site ops (activations, ``nn.Linear`` / ``nn.LayerNorm`` over channels-last features,
dropout, identity) are exact at active sites -- what they leave at inactive sites is ignored by the next
sparse layer, which reads only active inputs; anything else is flagged for review.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from kernels.sparse_conv.modules import (
    SparseAdaptiveAvgPool2d,
    SparseAvgPool2d,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLayerNorm,
    SparseMaxPool2d,
    conv_unsupported_reason,
)

_SPARSE_TYPES = (
    SparseConv2d,
    SparseBatchNorm2d,
    SparseLayerNorm,
    SparseMaxPool2d,
    SparseAvgPool2d,
    SparseAdaptiveAvgPool2d,
)
_PER_SITE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.Softmax,
)
_PER_SITE_NAMES = {"DropPath", "StochasticDepth", "LayerScale", "LayerScale2d", "Permute"}


@dataclasses.dataclass
class SparseReport:
    """What :func:`to_sparse` did: ``replaced`` (name, old type, new type), ``kept`` (name, type, reason)."""

    replaced: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"to_sparse: {len(self.replaced)} modules replaced, {len(self.kept)} left"]
        lines += [f"  replaced {n or '<root>'}: {a} -> {b}" for n, a, b in self.replaced]
        lines += [f"  left     {n or '<root>'}: {t} ({r})" for n, t, r in self.kept]
        return "\n".join(lines)


def _is_channels_first_ln(m: nn.Module) -> bool:
    if isinstance(m, SparseLayerNorm):
        return False
    if isinstance(m, nn.LayerNorm) and type(m).__name__ == "LayerNorm2d":
        return True
    return (
        getattr(m, "data_format", None) == "channels_first"
        and hasattr(m, "normalized_shape")
        and hasattr(m, "eps")
        and hasattr(m, "weight")
        and len(tuple(m.normalized_shape)) == 1
    )


def _convert(m: nn.Module):
    """(new module, None) or (None, reason it stays)."""
    try:
        if _is_channels_first_ln(m):
            return SparseLayerNorm.from_dense(m, "channels_first"), None
        if isinstance(m, nn.Conv2d):
            reason = conv_unsupported_reason(m)
            return (None, reason) if reason else (SparseConv2d.from_dense(m), None)
        if isinstance(m, nn.BatchNorm2d):
            return SparseBatchNorm2d.from_dense(m), None
        if isinstance(m, nn.MaxPool2d):
            return SparseMaxPool2d.from_dense(m), None
        if isinstance(m, nn.AvgPool2d):
            return SparseAvgPool2d.from_dense(m), None
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return SparseAdaptiveAvgPool2d.from_dense(m), None
    except (ValueError, TypeError) as exc:
        return None, str(exc)
    if isinstance(m, _PER_SITE):
        return None, "per-site op: exact at active sites"
    if type(m).__name__ in _PER_SITE_NAMES:
        return None, f"{type(m).__name__} (timm/torchvision per-sample or per-site op): exact at active sites"
    if isinstance(m, nn.Linear):
        return None, "per-site op on channels-last features: exact at active sites"
    if isinstance(m, nn.LayerNorm):
        return None, "layer norm over the last dim (channels-last features): per-site, exact at active sites"
    if isinstance(
        m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.GroupNorm, nn.InstanceNorm2d)
    ):
        return None, f"{type(m).__name__} has no sparse counterpart: mixes inactive sites densely (review)"
    return None, "unknown module type: left dense (check that it is a per-site op)"


def to_sparse(model: nn.Module) -> SparseReport:
    """Replace, in place, the convertible layers of ``model`` by sparse ones; return a :class:`SparseReport`.

    Use the converted model inside :func:`kernels.sparse_conv.sparse_context`; outside it the model computes
    exactly what it did before. Converting twice is a no-op (already sparse modules are reported as kept).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    report = SparseReport()
    for name, module in list(model.named_modules()):
        children = dict(module.named_children())
        if children and not _is_channels_first_ln(module):
            continue  # containers: their leaves are visited on their own
        if isinstance(module, _SPARSE_TYPES):
            report.kept.append((name, type(module).__name__, "already sparse"))
            continue
        new, reason = _convert(module)
        if new is None:
            report.kept.append((name, type(module).__name__, reason))
            continue
        if name == "":
            raise ValueError(
                "model: the root module itself is a convertible leaf; wrap it in an nn.Sequential"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        report.replaced.append((name, type(module).__name__, type(new).__name__))
    return report
