"""``patch_timm(model)``: the attention of a built timm ViT / DeiT / BEiT / EVA on :func:`kernels.attention`.

timm is never imported: modules are recognised by duck typing (attributes, parameter shapes and the
``forward`` signature), so the patch works on any timm version with these layouts and on look-alikes
(checked against real timm 1.0 by ``.ci/compat.sh``, ``pytest -m timm``):

* ViT / DeiT ``Attention``: ``qkv`` Linear(C, 3 H d), ``num_heads``, ``scale``, optional ``q_norm`` /
  ``k_norm`` (per head), ``norm`` (after the head merge) and ``gate`` (Linear: the merged heads times
  ``sigmoid(gate(x))``), ``attn_drop``, ``proj``, ``proj_drop``;
  ``forward(x[, attn_mask=None[, is_causal=False]])``.
* BEiT ``Attention``: as above plus ``q_bias`` / ``v_bias`` parameters with a zero ``k_bias`` buffer
  (``qkv`` without bias; ``qkv_bias_separate`` adds the bias after the matmul), optional
  ``relative_position_bias_table [R, H]`` + ``relative_position_index [N, N]``;
  ``forward(x, shared_rel_pos_bias=None[, attn_mask=None])``.
* EVA ``EvaAttention`` / ``AttentionRope``: the ViT members, fused ``qkv`` (with BEiT-style ``q_bias`` /
  ``k_bias`` / ``v_bias``) or separate ``q_proj`` / ``k_proj`` / ``v_proj`` Linears (``num_kv_heads``
  for grouped-query attention), rotary embeddings on the tokens after ``num_prefix_tokens``
  (``rotate_half`` layout or interleaved); ``forward(x, rope=None[, attn_mask=None[, is_causal=False]])``.
* BEiT shared ``RelativePositionBias``: ``relative_position_bias_table`` + ``relative_position_index``,
  ``forward()`` -> [H, N, N].

Maths of the patched attention (identical to timm's, whichever of its fused/unfused paths ran)::

    q, k, v = split(x W_qkv^T + b_qkv)            b_qkv = cat(q_bias, k_bias, v_bias) for BEiT / EVA
    q, k = q_norm(q), k_norm(k)
    q, k = rot(q), rot(k)                          EVA: rope = cat(sin, cos), prefix tokens untouched
    bias = table[index] (as [H, N, N])  + shared_rel_pos_bias  + attn_mask (bool -> 0 / -inf)
           (is_causal: -inf above the diagonal instead of attn_mask, as timm's math path)
    y = proj_drop(proj(norm(merge_heads(softmax(scale q k^T + bias) v)) * sigmoid(gate(x))))

The replacement takes over the original's parameters, buffers (same persistence) and submodules *as
objects*, so ``state_dict`` keys are unchanged, checkpoints load either way and an optimizer built before
the patch keeps training the same tensors. ``attn_drop > 0`` while training runs the math path with
dropout (the fused kernel has none). Anything else that looks like attention but does not match
(window masks, unknown submodules or arguments) is left alone and listed with the reason in the returned
:class:`PatchReport`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attn.attention import attention
from kernels.attn.modules import MultiheadSelfAttention
from kernels.attn.reference import attention_reference
from kernels.attn.relative_position import RelativePositionBias

VIT_SIGNATURES = (("x",), ("x", "attn_mask"), ("x", "attn_mask", "is_causal"))
BEIT_SIGNATURES = (("x", "shared_rel_pos_bias"), ("x", "shared_rel_pos_bias", "attn_mask"))
ROPE_SIGNATURES = (("x", "rope"), ("x", "rope", "attn_mask"), ("x", "rope", "attn_mask", "is_causal"))
ATTENTION_CHILDREN = {"qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "norm", "gate", "attn_drop",
                      "proj", "proj_drop"}
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


def _rotate(t: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's rotary helpers: ``rope_rotate_half`` ([-x2, x1]) or ``rot`` (interleaved pairs)."""
    if half:
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([-t2, t1], dim=-1)
    return torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)


def _apply_rope(t: torch.Tensor, rope: torch.Tensor, prefix: int, half: bool) -> torch.Tensor:
    """``t * cos + rotate(t) * sin`` on the tokens after ``prefix`` (kept as is); rope = cat(sin, cos)."""
    sin, cos = rope.chunk(2, dim=-1)
    body = t[:, :, prefix:]
    body = (body * cos + _rotate(body, half) * sin).to(t.dtype)
    return torch.cat([t[:, :, :prefix], body], dim=2)


class KernelAttention(nn.Module):
    """timm ViT/DeiT attention on :func:`kernels.attention`; ``forward(x, attn_mask=None, is_causal=False)``.

    The base of the BEiT and rotary variants, which differ only in their ``forward`` signature."""

    def __init__(self, original: nn.Module, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        _adopt(self, original)
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, float(scale)
        self.num_kv_heads = int(getattr(original, "num_kv_heads", None) or num_heads)
        self.qkv_bias_separate = bool(getattr(original, "qkv_bias_separate", False))
        self.num_prefix_tokens = int(getattr(original, "num_prefix_tokens", 0) or 0)
        self.rotate_half = bool(getattr(original, "rotate_half", False))
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

    def _qkv_fused(self, x: torch.Tensor) -> torch.Tensor:
        q_bias = self._parameters.get("q_bias")
        if q_bias is None:
            return self.qkv(x)
        k_bias = self._buffers.get("k_bias")
        k_bias = torch.zeros_like(q_bias) if k_bias is None else k_bias
        bias = torch.cat((q_bias, k_bias, self._parameters["v_bias"]))
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        if self._modules.get("qkv") is not None:
            return self._qkv_fused(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        Hkv = self.num_kv_heads
        q = self.q_proj(x).reshape(B, N, H, d).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, Hkv, d).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, Hkv, d).transpose(1, 2)
        return q, k, v

    def _bias(self, n_q: int, n_k: int, shared=None, attn_mask=None, is_causal=False, like=None):
        bias = None
        if self.rel_flat_index is not None:
            bias = _gather_rel_bias(self.relative_position_bias_table, self.rel_flat_index,
                                    self.relative_position_index.shape[0])
        if shared is not None:
            bias = shared if bias is None else bias + shared
        if is_causal:  # timm's math path: is_causal takes precedence over attn_mask
            attn_mask = torch.full((n_q, n_k), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = may attend (SDPA convention)
                attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            attn_mask = attn_mask.expand(*attn_mask.shape[:2], n_q, n_k)
            bias = attn_mask if bias is None else bias + attn_mask
        return bias

    def _attend(self, x: torch.Tensor, shared=None, attn_mask=None, rope=None, is_causal=False):
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        gate = self._modules.get("gate")
        gate = gate(x).sigmoid() if gate is not None else None
        q, k, v = self._project(x)
        q, k = self._apply_child("q_norm", q), self._apply_child("k_norm", k)
        if rope is not None:
            q = _apply_rope(q, rope, self.num_prefix_tokens, self.rotate_half).type_as(v)
            k = _apply_rope(k, rope, self.num_prefix_tokens, self.rotate_half).type_as(v)
        if self.num_kv_heads != H:  # grouped-query attention: kv head h // groups serves head h
            k = k.repeat_interleave(H // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(H // self.num_kv_heads, dim=1)
        bias = self._bias(N, N, shared, attn_mask, is_causal, like=q)
        if bias is not None and bias.dtype != q.dtype and bias.dtype not in (torch.float32,):
            bias = bias.to(q.dtype)
        p = self.attn_drop_p
        if p > 0.0 and self.training:
            out = attention_reference(q, k, v, bias, self.scale, dropout_p=p, training=True)
        else:
            out = attention(q, k, v, bias=bias, scale=self.scale)
        y = self._apply_child("norm", out.transpose(1, 2).reshape(B, N, H * d))
        if gate is not None:
            y = y * gate
        return self._apply_child("proj_drop", self.proj(y))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        return self._attend(x, attn_mask=attn_mask, is_causal=is_causal)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"num_heads={self.num_heads}{kv}, head_dim={self.head_dim}, scale={self.scale:.4g}"


class KernelBeitAttention(KernelAttention):
    """timm BEiT attention on :func:`kernels.attention`; ``forward(x, shared_rel_pos_bias=None)``."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._attend(x, shared=shared_rel_pos_bias, attn_mask=attn_mask)


class KernelRopeAttention(KernelAttention):
    """timm EVA / rotary attention on :func:`kernels.attention`; ``forward(x, rope=None, attn_mask=None,
    is_causal=False)``."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False):
        return self._attend(x, attn_mask=attn_mask, rope=rope, is_causal=is_causal)


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


def _projections(m: nn.Module, num_heads) -> tuple[int, int] | str:
    """``(head_dim, num_kv_heads)`` of a fused ``qkv`` or separate ``q_proj``/``k_proj``/``v_proj`` module."""
    qkv = m._modules.get("qkv")
    if not isinstance(num_heads, int) or num_heads < 1:
        return f"num_heads={num_heads!r} is not a positive int"
    if isinstance(qkv, nn.Linear):
        if any(m._modules.get(n) is not None for n in ("q_proj", "k_proj", "v_proj")):
            return "both a fused qkv and separate q/k/v projections: which one forward uses is ambiguous"
        if qkv.out_features % (3 * num_heads):
            return f"num_heads={num_heads!r} does not split qkv.out_features={qkv.out_features} into 3 x heads"
        return qkv.out_features // (3 * num_heads), num_heads
    proj = [m._modules.get(n) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, nn.Linear) for p in proj):
        return "needs a `qkv` nn.Linear or `q_proj`, `k_proj`, `v_proj` nn.Linear layers"
    q, k, v = proj
    if q.out_features % num_heads:
        return f"num_heads={num_heads} does not split q_proj.out_features={q.out_features}"
    head_dim = q.out_features // num_heads
    kv_heads = getattr(m, "num_kv_heads", None) or num_heads
    if not isinstance(kv_heads, int) or num_heads % kv_heads or k.out_features != kv_heads * head_dim \
            or v.out_features != k.out_features:
        return (f"k_proj/v_proj out_features {k.out_features}/{v.out_features} do not fit "
                f"num_kv_heads={kv_heads} x head_dim={head_dim}")
    if any(n in m._parameters for n in ("q_bias", "v_bias")):
        return "q_bias/v_bias next to separate q/k/v projections: their role in forward is not known"
    return head_dim, kv_heads


def recognise_attention(m: nn.Module):
    """``(replacement class, num_heads, head_dim, scale)`` for a patchable module, else the reason (str)."""
    sig = _signature(m)
    kind = (KernelAttention if sig in VIT_SIGNATURES else KernelBeitAttention if sig in BEIT_SIGNATURES
            else KernelRopeAttention if sig in ROPE_SIGNATURES else None)
    if kind is None:
        return (f"forward{sig} is not a recognised attention signature (x[, attn_mask[, is_causal]], "
                "x, shared_rel_pos_bias[, attn_mask] or x, rope[, attn_mask[, is_causal]])")
    proj = m._modules.get("proj")
    if not isinstance(proj, nn.Linear):
        return "needs a `proj` nn.Linear output projection"
    num_heads = getattr(m, "num_heads", None)
    found = _projections(m, num_heads)
    if isinstance(found, str):
        return found
    extra = (set(m._modules) - ATTENTION_CHILDREN) | (set(m._parameters) - ATTENTION_PARAMS)
    extra |= set(m._buffers) - ATTENTION_BUFFERS
    if extra:
        return f"unknown members {sorted(extra)} (their role in forward is not known)"
    head_dim, _ = found
    if proj.in_features != num_heads * head_dim:
        return f"proj.in_features={proj.in_features} != num_heads * head_dim = {num_heads * head_dim}"
    gate = m._modules.get("gate")
    if gate is not None and (not isinstance(gate, nn.Linear) or gate.out_features != num_heads * head_dim):
        return f"gate must be an nn.Linear to num_heads * head_dim = {num_heads * head_dim} features"
    if kind is KernelAttention and any(m._parameters.get(n) is not None for n in ATTENTION_PARAMS):
        return "a ViT-style forward(x[, attn_mask]) with BEiT parameters (q_bias / rel-pos table) is ambiguous"
    if kind is KernelRopeAttention:
        if m._parameters.get("relative_position_bias_table") is not None:
            return "a rotary forward(x, rope) with a relative position table is not a known layout"
        prefix = getattr(m, "num_prefix_tokens", None)
        if not isinstance(prefix, int) or prefix < 0:
            return f"num_prefix_tokens={prefix!r}: a rotary attention needs the number of prefix tokens"
        if head_dim % 2:
            return f"head_dim={head_dim} is odd: rotary embeddings rotate pairs"
    qkv = m._modules.get("qkv")
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
