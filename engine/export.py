"""Export a pre-trained encoder as safetensors that load into the matching timm model with ``strict=True``.

    python -m engine.export --checkpoint output/pretrain --out vit.safetensors [--force] [--verify]

After writing, it prints the exact call that loads the file (also stored in the safetensors metadata as
``timm_create_model``, with ``timm_model`` and ``timm_kwargs`` as JSON), e.g. for the default job::

    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, ...)
    model.load_state_dict(safetensors.torch.load_file("vit.safetensors"), strict=True)

``model(x)`` then gives the encoder's pooled features (what ``engine.eval`` uses) within float rounding;
``--verify`` checks exactly that with timm (when it is installed). One :class:`TimmSpec` per encoder kind:

======================  ================================================================================
engine encoder          timm model
======================  ================================================================================
ViT, absolute position  ``VisionTransformer`` (``vit_*``): layer scale ``blocks.i.ls1.gamma``; cls
embedding, qkv bias     pooling ``global_pool="token"``, mean pooling ``global_pool="avg", fc_norm=False``
BEiT-style (q/v bias    ``Beit`` (``beit_*``): ``blocks.i.gamma_1``, per-layer
or rel-pos bias)        ``blocks.i.attn.relative_position_bias_table`` or shared ``rel_pos_bias.*``;
                        ``global_pool="token"`` or ``global_pool="avg", use_fc_norm=False``
ResNet (ImageNet stem)  ``resnet18/34/50/101`` (torchvision names, as ours); ``resnet_femto``'s CIFAR stem
                        has no timm counterpart: the file keeps the names and says so
ConvNeXt                ``convnext_*`` (``stem.*``, ``stages.i.downsample.*``, ``stages.i.blocks.j.conv_dw``,
                        ``.mlp.fc1`` ..., ``head.norm``); ``convnext_femto``'s 1x1 stem is ``patch_size=1``
Swin                    its own ``timm_spec()`` (timm's names already)
======================  ================================================================================

Why the pooling kwargs: our encoders normalise every token and then average the patch tokens, whereas
timm's ``global_pool="avg"`` defaults to averaging first and normalising after (``fc_norm``), which expects
other keys (``fc_norm.*``) and gives other features. SparK checkpoints hold the encoder converted by
:func:`kernels.to_sparse`; its sparse modules keep the dense modules' parameter names, so the export is the
plain dense network. Pre-training-only tensors (the mask token) and non-persistent index buffers are not
exported. Tokenizer checkpoints: ``--method dvae`` is refused (a dVAE is not an encoder; use the checkpoint
itself as ``--tokenizer``), ``--method vqkd`` exports the tokenizer's ViT encoder only.

A new encoder kind plugs in with a ``timm_spec(self)`` method on the encoder returning a :class:`TimmSpec`
(for modules that already use timm's names: ``TimmSpec.from_module(self, "swin_tiny_patch4_window7_224",
kwargs)``) or a dict ``{"name", "kwargs", "drop"}`` (timm model, its kwargs, state-dict keys not exported);
or with ``@register_timm_spec(EncoderClass)`` on a function ``encoder -> TimmSpec``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

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


# --------------------------------------------------------------------------------------------- files
def non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding a NaN or an Inf."""
    return [k for k, t in state_dict.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    bad = non_finite(state_dict)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ExportError(f"export: the encoder holds non-finite values (NaN/Inf) in {', '.join(bad[:3])}"
                          f"{more}; refusing to export it (export an earlier, finite checkpoint)")


def timm_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's parameters and persistent buffers under timm names (contiguous CPU tensors)."""
    return timm_spec(encoder).state_dict


def timm_layout(encoder: nn.Module) -> str:
    return timm_spec(encoder).layout


def timm_model_name(encoder: nn.Module) -> str:
    return timm_spec(encoder).model or ""


def export(encoder: nn.Module, out: str | Path, metadata: dict | None = None,
           spec: TimmSpec | None = None) -> Path:
    """Write ``encoder`` under timm names to ``out`` (atomically: a temp file, then ``os.replace``).

    Raises :class:`ExportError` (nothing written) when a tensor is not finite."""
    from safetensors.torch import save_file

    spec = spec or timm_spec(encoder)
    check_finite(spec.state_dict)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "layout": spec.layout, "timm_model": spec.model or "",
            "timm_kwargs": json.dumps(spec.kwargs), "timm_create_model": spec.create_model_call(),
            "notes": json.dumps(spec.notes),
            "config": json.dumps(getattr(encoder, "config", {}), sort_keys=True)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        save_file(spec.state_dict, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def verify_with_timm(encoder: nn.Module, path: str | Path, spec: TimmSpec | None = None,
                     image_size: int | None = None, dtype: torch.dtype = torch.float32,
                     rtol: float | None = None) -> float:
    """Load ``path`` into the spec's timm model (``strict=True``) and compare its pooled features with the
    encoder's on random images (eval mode, ``dtype``). Returns the largest difference; raises
    :class:`ExportError` when it exceeds ``rtol`` (default 1e-4 in float32, 1e-8 in float64) times the
    largest feature."""
    from safetensors.torch import load_file

    spec = spec or timm_spec(encoder)
    rtol = rtol if rtol is not None else (1e-8 if dtype == torch.float64 else 1e-4)
    model = spec.build()
    model.load_state_dict(load_file(str(path)), strict=True)
    cfg = getattr(encoder, "config", {})
    size = int(image_size or cfg.get("img_size") or 64)
    x = torch.randn(2, int(cfg.get("in_chans", 3)), size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype)
    ours = copy.deepcopy(encoder).to(dtype).eval()
    model = model.to(dtype).eval()
    with torch.no_grad():
        a, b = ours(x), model(x)
    if a.shape != b.shape:
        raise ExportError(f"export: timm's {spec.model} gives features of shape {tuple(b.shape)}, the "
                          f"encoder {tuple(a.shape)}")
    diff = float((a - b).abs().max())
    if not diff <= rtol * max(1.0, float(a.abs().max())):
        raise ExportError(f"export: timm's {spec.model} loads the file but its features differ from the "
                          f"encoder's by up to {diff:.3g}")
    return diff


# --------------------------------------------------------------------------------------------- CLI
_METHOD_NOTES = {
    "dvae": ("--checkpoint holds a --method dvae tokenizer, and engine.export writes encoders only "
             "(ViT/BEiT, ResNet, ConvNeXt, Swin) in timm layout: a dVAE has no timm counterpart; use the "
             "checkpoint itself as --tokenizer of --method beit"),
    "vqkd": ("a --method vqkd checkpoint is a tokenizer: exported its ViT encoder only (no task layers, "
             "codebook or decoder); the tokenizer itself is the checkpoint (--tokenizer of --method beitv2)"),
    "dino": "--method dino: exported the teacher's backbone (the EMA encoder that engine.eval evaluates)",
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _input_file(checkpoint: str) -> Path:
    from engine.trainer.checkpoint import LAST

    path = Path(checkpoint)
    return path / LAST if path.is_dir() else path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.splitlines()[0])
    p.error = lambda m: p.exit(2, f"{p.prog}: error: {m}\n")  # type: ignore[method-assign]
    p.add_argument("--checkpoint", required=True, help="checkpoint file or output folder of engine.pretrain")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out if it exists (never the input checkpoint)")
    p.add_argument("--verify", action="store_true",
                   help="load the file into the timm model and compare its features with the encoder's "
                        "(needs timm)")
    args = p.parse_args(argv)
    out, source = Path(args.out), _input_file(args.checkpoint)
    if out.is_dir():
        p.error(f"--out {out} is a folder; give the .safetensors file to write")
    if _same_file(out, source):
        p.error(f"--out {out} is the input checkpoint; refusing to write over it (even with --force)")
    if out.exists() and not args.force:
        p.error(f"--out {out} exists; pass --force to overwrite it")
    if args.verify:
        try:
            import timm  # noqa: F401
        except ImportError:
            p.error("--verify needs timm (pip install timm)")
    from engine.eval import encoder_from_checkpoint, load_checkpoint

    from engine import exit_codes
    from engine.trainer.checkpoint import CheckpointError

    try:
        state = load_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        p.error(_one_line(exc))
    except CheckpointError as exc:  # unreadable, corrupted, non-finite: the checkpoint error status (5)
        p.exit(exit_codes.CHECKPOINT, f"{p.prog}: error: {_one_line(exc)}\n")
    method = str(state.get("config", {}).get("method", ""))
    if method == "dvae":
        p.error(_METHOD_NOTES["dvae"])
    try:
        encoder, cfg = encoder_from_checkpoint(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        p.error(f"--checkpoint {source}: cannot rebuild its encoder: {_one_line(exc)}")
    try:
        spec = timm_spec(encoder)
        if method in _METHOD_NOTES:
            spec.notes.insert(0, _METHOD_NOTES[method])
        path = export(encoder, out, spec=spec, metadata={"method": method, "model": cfg.get("model", "")})
        diff = None
        if args.verify and spec.model:
            diff = verify_with_timm(encoder, path, spec, cfg.get("image_size"))
    except ValueError as exc:  # ExportError, or a timm_spec() that rejects its encoder's options
        p.error(_one_line(exc).removeprefix("export: "))
    what = f"the {cfg.get('model')} encoder of --method {method}" if method else "the encoder"
    print(f"wrote {path}: {len(spec.state_dict)} tensors, {what}, timm layout {spec.layout}")
    if spec.model:
        print(f"load with: model = {spec.create_model_call()}")
        print(f"           model.load_state_dict(safetensors.torch.load_file({json.dumps(str(path))}), "
              "strict=True)")
    for note in spec.notes:
        print(f"note: {note}")
    if diff is not None:
        print(f"verified: timm's {spec.model} loads it (strict) and its features match the encoder's "
              f"(max |diff| {diff:.2g})")
    elif args.verify:
        print("not verified: no timm model loads this encoder (see the note)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
