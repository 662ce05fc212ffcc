"""``patch_timm(model)``: swap the attention of a built timm ViT / DeiT / BEiT for :func:`kernels.attention`.

timm is never imported: modules are recognised by duck typing (attributes, parameter shapes and the
``forward`` signature), so the patch works on any timm version with these layouts and on look-alikes:

* ViT / DeiT ``Attention``: ``qkv`` Linear(C, 3 H d), ``num_heads``, ``scale``, optional ``q_norm`` /
  ``k_norm`` (per head) and ``norm`` (after the head merge), ``attn_drop``, ``proj``, ``proj_drop``;
  ``forward(x)`` or ``forward(x, attn_mask=None)``.
* BEiT ``Attention``: as above plus ``q_bias`` / ``v_bias`` parameters with a zero ``k_bias`` buffer
  (``qkv`` without bias; ``qkv_bias_separate`` adds the bias after the matmul), optional
  ``relative_position_bias_table [R, H]`` + ``relative_position_index [N, N]``;
  ``forward(x, shared_rel_pos_bias=None[, attn_mask=None])``.
* BEiT shared ``RelativePositionBias``: ``relative_position_bias_table`` + ``relative_position_index``,
  ``forward()`` -> [H, N, N].

Maths of the patched attention (identical to timm's, whichever of its fused/unfused paths ran)::

    q, k, v = split(x W_qkv^T + b_qkv)            b_qkv = cat(q_bias, k_bias, v_bias) for BEiT
    q, k = q_norm(q), k_norm(k)
    bias = table[index] (as [H, N, N])  + shared_rel_pos_bias  + attn_mask (bool -> 0 / -inf)
    y = proj_drop(proj(norm(merge_heads(softmax(scale q k^T + bias) v))))

The replacement takes over the original's parameters, buffers (same persistence) and submodules *as
objects*, so ``state_dict`` keys are unchanged, checkpoints load either way and an optimizer built before
the patch keeps training the same tensors. ``attn_drop > 0`` while training runs the math path with
dropout (the fused kernel has none). Anything else that looks like attention but does not match
(separate q/k/v projections, rotary embeddings, window masks, unknown submodules or arguments) is left
alone and listed with the reason in the returned :class:`PatchReport`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention.function import attention
from kernels.attention.module import MultiheadSelfAttention
from kernels.attention.reference import attention_reference
from kernels.attention.relative_position import RelativePositionBias

VIT_SIGNATURES = (("x",), ("x", "attn_mask"))
BEIT_SIGNATURES = (("x", "shared_rel_pos_bias"), ("x", "shared_rel_pos_bias", "attn_mask"))
ATTENTION_CHILDREN = {"qkv", "q_norm", "k_norm", "norm", "attn_drop", "proj", "proj_drop"}
ATTENTION_PARAMS = {"q_bias", "v_bias", "relative_position_bias_table"}
ATTENTION_BUFFERS = {"k_bias", "relative_position_index"}


@dataclasses.dataclass
class PatchReport:
    """``replaced``: qualified name -> what it became; ``left``: qualified name -> why it was not patched."""

    replaced: dict[str, str] = dataclasses.field(default_factory=dict)
    left: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patched {len(self.replaced)} module(s), left {len(self.left)}"]
        lines += [f"  replaced {n or '<root>'}: {k}" for n, k in self.replaced.items()]
        lines += [f"  left     {n or '<root>'}: {why}" for n, why in self.left.items()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# replacement modules


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """Move ``old``'s parameters, buffers (with persistence) and children onto ``new`` as the same objects."""
    for name, p in old._parameters.items():
        new.register_parameter(name, p)
    for name, b in old._buffers.items():
        new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        new.add_module(name, child)
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(old, hooks):  # same dict objects: handles registered on the original still remove them
            setattr(new, hooks, getattr(old, hooks))
    new.train(old.training)


def _flat_rel_index(index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Offsets into a flattened [R, H] table giving the [H, N, N] bias with one ``index_select``."""
    heads = torch.arange(num_heads, device=index.device)[:, None]
    return (index.reshape(1, -1).long() * num_heads + heads).reshape(-1)


def _gather_rel_bias(table: torch.Tensor, flat_index: torch.Tensor, n: int) -> torch.Tensor:
    return table.reshape(-1).index_select(0, flat_index).view(table.shape[1], n, n)


class KernelRelativePositionBias(nn.Module):
    """BEiT's shared relative position bias on its own table and index: ``forward() -> [H, N, N]``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        _adopt(self, original)
        self.window_size = getattr(original, "window_size", None)
        table, index = self.relative_position_bias_table, self.relative_position_index
        self.register_buffer("flat_index", _flat_rel_index(index, table.shape[1]), persistent=False)

    def forward(self) -> torch.Tensor:
        return _gather_rel_bias(self.relative_position_bias_table, self.flat_index,
                                self.relative_position_index.shape[0])


class KernelAttention(nn.Module):
    """timm ViT/DeiT attention on :func:`kernels.attention`; ``forward(x, attn_mask=None)``."""

    def __init__(self, original: nn.Module, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        _adopt(self, original)
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, float(scale)
        self.qkv_bias_separate = bool(getattr(original, "qkv_bias_separate", False))
        if "attn_drop" not in self._modules and isinstance(getattr(original, "attn_drop", None), (int, float)):
            self.attn_drop = float(original.attn_drop)
        index = self._buffers.get("relative_position_index")
        table = self._parameters.get("relative_position_bias_table")
        if table is not None and index is not None:
            self.register_buffer("rel_flat_index", _flat_rel_index(index, num_heads), persistent=False)
        else:
            self.rel_flat_index = None

    @property
    def attn_drop_p(self) -> float:
        drop = getattr(self, "attn_drop", None)
        if isinstance(drop, nn.Dropout):
            return float(drop.p)
        return float(drop) if isinstance(drop, (int, float)) else 0.0

    def _apply_child(self, name: str, t: torch.Tensor) -> torch.Tensor:
        child = self._modules.get(name)
        return t if child is None else child(t)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        q_bias = self._parameters.get("q_bias")
        if q_bias is None:
            return self.qkv(x)
        k_bias = self._buffers.get("k_bias")
        k_bias = torch.zeros_like(q_bias) if k_bias is None else k_bias
        bias = torch.cat((q_bias, k_bias, self._parameters["v_bias"]))
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)

    def _bias(self, n_q: int, n_k: int, shared=None, attn_mask=None):
        bias = None
        if self.rel_flat_index is not None:
            bias = _gather_rel_bias(self.relative_position_bias_table, self.rel_flat_index,
                                    self.relative_position_index.shape[0])
        if shared is not None:
            bias = shared if bias is None else bias + shared
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = may attend (SDPA convention)
                attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            attn_mask = attn_mask.expand(*attn_mask.shape[:2], n_q, n_k)
            bias = attn_mask if bias is None else bias + attn_mask
        return bias

    def _attend(self, x: torch.Tensor, shared=None, attn_mask=None) -> torch.Tensor:
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = self._qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self._apply_child("q_norm", q), self._apply_child("k_norm", k)
        bias = self._bias(N, N, shared, attn_mask)
        if bias is not None and bias.dtype != q.dtype and bias.dtype not in (torch.float32,):
            bias = bias.to(q.dtype)
        p = self.attn_drop_p
        if p > 0.0 and self.training:
            out = attention_reference(q, k, v, bias, self.scale, dropout_p=p, training=True)
        else:
            out = attention(q, k, v, bias=bias, scale=self.scale)
        y = self._apply_child("norm", out.transpose(1, 2).reshape(B, N, H * d))
        return self._apply_child("proj_drop", self.proj(y))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._attend(x, attn_mask=attn_mask)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.4g}"


class KernelBeitAttention(KernelAttention):
    """timm BEiT attention on :func:`kernels.attention`; ``forward(x, shared_rel_pos_bias=None)``."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._attend(x, shared=shared_rel_pos_bias, attn_mask=attn_mask)


# ----------------------------------------------------------------------------------------------------------
# recognition


def _signature(m: nn.Module) -> tuple[str, ...] | None:
    try:
        params = inspect.signature(type(m).forward).parameters
    except (TypeError, ValueError):
        return None
    return tuple(n for n in params if n != "self")


def _looks_like_attention(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    return "attention" in name or "attn" in name or hasattr(m, "qkv")


def _looks_like_rel_pos(m: nn.Module) -> bool:
    return "relative_position_bias_table" in m._parameters and not hasattr(m, "qkv")


def _check_rel_pos(table, index, num_heads) -> str | None:
    if (table is None) != (index is None):
        return "relative_position_bias_table and relative_position_index must both be set"
    if table is None:
        return None
    if table.dim() != 2 or table.shape[1] != num_heads:
        return f"relative_position_bias_table has shape {tuple(table.shape)}, expected [rows, num_heads={num_heads}]"
    if index.dim() != 2 or index.shape[0] != index.shape[1] or index.is_floating_point():
        return f"relative_position_index has shape {tuple(index.shape)}, expected an integer [N, N]"
    return None


def recognise_attention(m: nn.Module):
    """``(replacement class, num_heads, head_dim, scale)`` for a patchable module, else the reason (str)."""
    sig = _signature(m)
    kind = KernelAttention if sig in VIT_SIGNATURES else KernelBeitAttention if sig in BEIT_SIGNATURES else None
    if kind is None:
        return f"forward{sig} is not a recognised attention signature (x[, attn_mask] or x[, shared_rel_pos_bias])"
    qkv, proj = m._modules.get("qkv"), m._modules.get("proj")
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return "needs `qkv` and `proj` nn.Linear layers (separate q/k/v projections are not supported)"
    extra = (set(m._modules) - ATTENTION_CHILDREN) | (set(m._parameters) - ATTENTION_PARAMS)
    extra |= set(m._buffers) - ATTENTION_BUFFERS
    if extra:
        return f"unknown members {sorted(extra)} (their role in forward is not known)"
    num_heads = getattr(m, "num_heads", None)
    if not isinstance(num_heads, int) or num_heads < 1 or qkv.out_features % (3 * num_heads):
        return f"num_heads={num_heads!r} does not split qkv.out_features={qkv.out_features} into 3 x heads"
    head_dim = qkv.out_features // (3 * num_heads)
    if proj.in_features != num_heads * head_dim:
        return f"proj.in_features={proj.in_features} != num_heads * head_dim = {num_heads * head_dim}"
    if kind is KernelAttention and any(m._parameters.get(n) is not None for n in ATTENTION_PARAMS):
        return "a ViT-style forward(x[, attn_mask]) with BEiT parameters (q_bias / rel-pos table) is ambiguous"
    q_bias, v_bias = m._parameters.get("q_bias"), m._parameters.get("v_bias")
    if (q_bias is None) != (v_bias is None):
        return "q_bias and v_bias must both be set or both be None"
    if q_bias is not None and (q_bias.shape != (qkv.out_features // 3,) or v_bias.shape != q_bias.shape):
        return f"q_bias/v_bias must have shape ({qkv.out_features // 3},)"
    if q_bias is not None and qkv.bias is not None and not getattr(m, "qkv_bias_separate", False):
        return "qkv has its own bias besides q_bias/v_bias: which one forward uses is ambiguous"
    reason = _check_rel_pos(m._parameters.get("relative_position_bias_table"),
                            m._buffers.get("relative_position_index"), num_heads)
    if reason:
        return reason
    drop = m._modules.get("attn_drop")
    if drop is not None and not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"attn_drop is a {type(drop).__name__}, expected nn.Dropout"
    scale = getattr(m, "scale", None)
    scale = head_dim**-0.5 if scale is None else scale
    if not isinstance(scale, (int, float)):
        return f"scale must be a python number, got {type(scale).__name__}"
    return kind, num_heads, head_dim, float(scale)


def patch_timm(model: nn.Module) -> PatchReport:
    """Replace, in place, every recognised attention (and BEiT shared rel-pos bias) module of ``model``.

    Returns a :class:`PatchReport`. Outputs and gradients equal the unpatched model's within the dtype's
    rounding (the kernels compute the same function). Patching twice is a no-op for patched modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    for name, module in list(model.named_modules()):
        if isinstance(module, (KernelAttention, KernelRelativePositionBias, MultiheadSelfAttention,
                               RelativePositionBias)):
            continue  # already ours
        if _looks_like_rel_pos(module):
            sig = _signature(module)
            reason = None if sig == () else f"forward{sig} takes arguments; expected forward() -> [H, N, N]"
            table, index = module._parameters.get("relative_position_bias_table"), module._buffers.get(
                "relative_position_index")
            if reason is None and (table is None or index is None):
                reason = "relative_position_bias_table or relative_position_index is None"
            if reason is None and (set(module._modules) or set(module._parameters) - ATTENTION_PARAMS
                                   or set(module._buffers) - ATTENTION_BUFFERS):
                reason = "unknown members besides the table and index"
            reason = reason or _check_rel_pos(table, index, table.shape[1])
            if reason is None and not name:
                reason = "the root module cannot be replaced in place"
            if reason:
                report.left[name] = reason
                continue
            _replace(model, name, KernelRelativePositionBias(module))
            report.replaced[name] = "KernelRelativePositionBias"
            continue
        if not _looks_like_attention(module) or _is_container_of_attention(module):
            continue
        found = recognise_attention(module)
        if isinstance(found, str):
            report.left[name] = found
            continue
        if not name:
            report.left[name] = "the root module cannot be replaced in place"
            continue
        kind, num_heads, head_dim, scale = found
        _replace(model, name, kind(module, num_heads, head_dim, scale))
        report.replaced[name] = kind.__name__
    return report


def _is_container_of_attention(m: nn.Module) -> bool:
    """Blocks named e.g. ``AttentionBlock`` hold an attention module; only leaves-with-qkv are candidates."""
    return "qkv" not in m._modules and any(_looks_like_attention(c) for c in m.children())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
