"""The timm layout of each encoder kind (:mod:`engine.export`): one :class:`TimmSpec` per kind, found by
:func:`timm_spec` -- the encoder's own ``timm_spec()`` method, else a function registered with
``@register_timm_spec(EncoderClass)`` (ViT/BEiT, ResNet and ConvNeXt below)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.models.convnext import CONVNEXT_CONFIGS, ConvNeXt
from engine.models.resnet import ResNet
from engine.models.vit import VisionTransformer

_DROP = ("mask_token",)
_TIMM_LN_EPS = 1e-6  # the LayerNorm eps of timm's ViT / Beit / ConvNeXt


class ExportError(ValueError):
    """An encoder or a request that cannot be exported; the message is one line."""


@dataclasses.dataclass
class TimmSpec:
    """How an encoder maps onto timm: ``timm.create_model(model, pretrained=False, **kwargs)`` loads
    ``state_dict`` with ``strict=True``. ``model=None``: no timm model can load it (``notes`` say why)."""

    model: str | None
    kwargs: dict
    state_dict: dict[str, torch.Tensor]
    layout: str
    notes: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_module(cls, encoder: nn.Module, model: str | None, kwargs: dict, layout: str | None = None,
                    rename: Callable[[str], str | None] | None = None, notes: Iterable[str] = (),
                    drop: Iterable[str] = ()) -> TimmSpec:
        """The spec of an encoder whose ``state_dict``, each name passed through ``rename``, is the timm one.
        Not exported: the keys in ``drop``, pre-training tensors (:data:`_DROP`) and the names ``rename``
        maps to None."""
        drop = set(drop)
        out: dict[str, torch.Tensor] = {}
        for name, t in encoder.state_dict().items():
            if name in drop or name.rsplit(".", 1)[-1] in _DROP:
                continue
            new = rename(name) if rename is not None else name
            if new is None:
                continue
            if new in out:
                raise ExportError(f"export: two tensors map onto {new!r}")
            out[new] = t.detach().to("cpu").contiguous()
        return cls(model, dict(kwargs), out, layout or type(encoder).__name__.lower(), list(notes))

    def create_model_call(self) -> str:
        """``timm.create_model("name", pretrained=False, k=v, ...)`` as Python ("" without a timm model)."""
        if not self.model:
            return ""
        args = [json.dumps(self.model), "pretrained=False"]
        args += [f"{k}={_py(v)}" for k, v in self.kwargs.items()]
        return f"timm.create_model({', '.join(args)})"

    def build(self) -> nn.Module:
        """The (randomly initialised) timm model this spec loads into; needs timm."""
        if not self.model:
            raise ExportError("export: " + " ".join(self.notes or ["no timm model for this encoder"]))
        import timm

        return timm.create_model(self.model, pretrained=False, **self.kwargs)


def _py(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_py(x) for x in v) + "]"
    return repr(v)


_SPECS: dict[type, Callable[[nn.Module], TimmSpec]] = {}


def register_timm_spec(encoder_class: type):
    """Decorator: ``fn(encoder) -> TimmSpec`` for encoders of ``encoder_class`` (and subclasses)."""

    def deco(fn):
        _SPECS[encoder_class] = fn
        return fn

    return deco


def timm_spec(encoder: nn.Module) -> TimmSpec:
    """The :class:`TimmSpec` of ``encoder``: its own ``timm_spec()`` method, else the registered one."""
    own = getattr(encoder, "timm_spec", None)
    if callable(own):
        spec = own()
        if isinstance(spec, dict):  # {"name", "kwargs", "drop"} (engine.models.swin)
            layout = str(getattr(encoder, "config", {}).get("arch") or type(encoder).__name__.lower())
            spec = TimmSpec.from_module(encoder, spec["name"], spec.get("kwargs", {}), layout,
                                        drop=spec.get("drop", ()))
        if not isinstance(spec, TimmSpec):
            raise ExportError(f"export: {type(encoder).__name__}.timm_spec() returned a "
                              f"{type(spec).__name__}, expected a TimmSpec or a dict with name/kwargs/drop")
        return spec
    for klass in type(encoder).__mro__:
        if klass in _SPECS:
            return _SPECS[klass](encoder)
    raise ExportError(
        f"export: no timm layout for a {type(encoder).__name__} encoder; engine.export writes encoders only "
        f"(ViT/BEiT, ResNet, ConvNeXt, Swin, or a kind with a timm_spec() method / @register_timm_spec)"
    )


# --------------------------------------------------------------------------------------------- ViT / BEiT
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_POOL = {"cls": "token", "mean": "avg"}


@register_timm_spec(VisionTransformer)
def _vit_spec(encoder: VisionTransformer) -> TimmSpec:
    c = encoder.config
    depth, beit = int(c["depth"]), _is_beit(c)
    pool = c.get("global_pool", "cls")
    if pool not in _POOL:
        raise ExportError(f"export: unknown ViT pooling {pool!r} (expected 'cls' or 'mean')")
    init_values = c.get("init_values")
    kwargs = dict(num_classes=0, img_size=int(c["img_size"]), patch_size=int(c["patch_size"]),
                  in_chans=int(c.get("in_chans", 3)), embed_dim=int(c["embed_dim"]), depth=depth,
                  num_heads=int(c["num_heads"]), mlp_ratio=float(c.get("mlp_ratio", 4.0)),
                  # 0.0, not None: timm.create_model drops None kwargs (the entrypoint's default would stay)
                  init_values=float(init_values) if init_values and init_values > 0 else 0.0)
    notes = []
    if float(c.get("norm_eps", _TIMM_LN_EPS)) != _TIMM_LN_EPS:
        notes.append(f"the encoder's LayerNorm eps is {c['norm_eps']}, timm's {_TIMM_LN_EPS}: the features "
                     "differ slightly")

    def rename(name: str) -> str | None:
        if name.endswith("relative_position_index"):
            return None
        name = re.sub(r"^blocks\.(\d+)\.rel_pos_bias\.relative_position_bias_table$",
                      r"blocks.\1.attn.relative_position_bias_table", name)
        if not beit:
            name = re.sub(r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma", name)
        return name

    if not beit:
        kwargs.update(qkv_bias=bool(c.get("qkv_bias")),
                      pos_embed="learn" if c.get("use_abs_pos_emb", True) else "none",
                      global_pool=_POOL[pool], fc_norm=False)
        name = f"vit_{_VIT_SIZES.get(kwargs['embed_dim'], 'base')}_patch16_224"
        return TimmSpec.from_module(encoder, name, kwargs, "vit", rename, notes)
    kwargs.update(qkv_bias=bool(c.get("qv_bias") or c.get("qkv_bias")),
                  use_abs_pos_emb=bool(c.get("use_abs_pos_emb", True)),
                  use_rel_pos_bias=bool(c.get("use_rel_pos_bias")),
                  use_shared_rel_pos_bias=bool(c.get("use_shared_rel_pos_bias")),
                  global_pool=_POOL[pool], use_fc_norm=False)
    name = "beit_large_patch16_224" if kwargs["embed_dim"] == 1024 else "beit_base_patch16_224"
    spec = TimmSpec.from_module(encoder, name, kwargs, "beit", rename, notes)
    if c.get("qkv_bias") and not c.get("qv_bias"):
        # timm's Beit has q/v biases only; a k bias adds q.b_k to all scores of a query: it cancels in softmax
        for i in range(depth):
            b = spec.state_dict.pop(f"blocks.{i}.attn.qkv.bias")
            d = b.numel() // 3
            spec.state_dict[f"blocks.{i}.attn.q_bias"] = b[:d].clone()
            spec.state_dict[f"blocks.{i}.attn.v_bias"] = b[2 * d:].clone()
        spec.notes.append("each qkv bias is exported as Beit's q_bias/v_bias: its k part is dropped (it adds "
                          "the same value to every score of a query, so the softmax and the features are "
                          "unchanged)")
    return spec


def _is_beit(cfg: dict) -> bool:
    return bool(cfg.get("qv_bias") or cfg.get("use_rel_pos_bias") or cfg.get("use_shared_rel_pos_bias"))


# --------------------------------------------------------------------------------------------- ResNet
_TIMM_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


@register_timm_spec(ResNet)
def _resnet_spec(encoder: ResNet) -> TimmSpec:
    c = encoder.config
    block, layers, widths = c["block"], tuple(c["layers"]), tuple(c["widths"])
    label = c.get("name") or "this ResNet"
    if c["stem"] != "imagenet" or widths[0] != 64:
        why = (f"no timm model loads {label}: its stem (conv3x3/1 to {widths[0]} channels, no max-pool) is "
               "not one of timm's ResNet stems (conv7x7/2 to 64 channels + max-pool, or the 3-conv deep "
               "stems); the file keeps the torchvision/timm ResNet names and loads (strict) into "
               f"engine.models.resnet.build_resnet({label!r})")
        return TimmSpec.from_module(encoder, None, {}, "resnet", notes=[why])
    name = next((n for n, (b, ls) in _TIMM_RESNETS.items() if b == block and ls == layers), None)
    kwargs: dict = {"num_classes": 0}
    if name is None:
        name = "resnet18" if block == "basic" else "resnet50"
        kwargs["layers"] = list(layers)
    if widths != (64, 128, 256, 512):
        kwargs["channels"] = list(widths)
    if int(c.get("in_chans", 3)) != 3:
        kwargs["in_chans"] = int(c["in_chans"])
    return TimmSpec.from_module(encoder, name, kwargs, "resnet")


# --------------------------------------------------------------------------------------------- ConvNeXt
_CONVNEXT_RULES = [
    (r"^downsample_layers\.0\.([01])\.", r"stem.\1."),
    (r"^downsample_layers\.(\d+)\.([01])\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", r"head.norm."),
]
_TIMM_CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base")


def _convnext_name(name: str) -> str:
    for pattern, repl in _CONVNEXT_RULES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise ExportError(f"export: ConvNeXt tensor {name!r} has no timm name")


@register_timm_spec(ConvNeXt)
def _convnext_spec(encoder: ConvNeXt) -> TimmSpec:
    c = encoder.config
    depths, dims = tuple(c["depths"]), tuple(c["dims"])
    name = next((n for n in _TIMM_CONVNEXTS if tuple(CONVNEXT_CONFIGS[n]["depths"]) == depths
                 and tuple(CONVNEXT_CONFIGS[n]["dims"]) == dims), None)
    kwargs: dict = {"num_classes": 0}
    if name is None:
        name = "convnext_tiny"
        kwargs.update(depths=list(depths), dims=list(dims))
    if int(c.get("stem_stride", 4)) != 4:
        kwargs["patch_size"] = int(c["stem_stride"])
    if int(c.get("in_chans", 3)) != 3:
        kwargs["in_chans"] = int(c["in_chans"])
    spec = TimmSpec.from_module(encoder, name, kwargs, "convnext", _convnext_name)
    layer_scale = c.get("layer_scale", 1e-6)
    if not layer_scale or layer_scale <= 0:
        # timm's blocks have a gamma here (create_model drops ls_init_value=None): gamma = 1 is the identity
        for i, (n, dim) in enumerate(zip(depths, dims)):
            for j in range(n):
                spec.state_dict[f"stages.{i}.blocks.{j}.gamma"] = torch.ones(dim)
        spec.notes.append("the encoder has no layer scale: exported gamma = 1 for timm's blocks (the same "
                          "function)")
    return spec
