"""Pre-trained encoders for fine-tuning: their architecture (:func:`kind_of`, :func:`build_encoder`) and where
their weights come from (:func:`load_source`: an ``engine.pretrain`` checkpoint of any method, or an
``engine.export`` safetensors file under timm names, renamed back to this engine's)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import torch
from torch import nn

KINDS = ("vit", "resnet", "convnext", "swin")
# where each pre-training method keeps the encoder that engine.eval evaluates (``method.encoder()``)
ENCODER_PREFIX = {"simmim": "backbone.", "beit": "backbone.", "beitv2": "backbone.", "spark": "net.",
                  "dino": "teacher.backbone.", "vqkd": "tokenizer.encoder.", "finetune": "backbone."}


# ------------------------------------------------------------------------------------------------ architecture
def kind_of(encoder_config: dict | None, model: str | None = None) -> str:
    if encoder_config and encoder_config.get("arch") in ("resnet", "convnext", "swin"):
        return encoder_config["arch"]
    if encoder_config:
        return "vit"
    from engine.models.convnext import CONVNEXT_CONFIGS
    from engine.models.resnet import RESNET_CONFIGS
    from engine.models.swin import is_swin

    if model in RESNET_CONFIGS:
        return "resnet"
    if model in CONVNEXT_CONFIGS:
        return "convnext"
    if is_swin(model):
        return "swin"
    return "vit"


def _accepted(cls, config: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params and k != "self"}


def build_encoder(kind: str, config: dict, **overrides) -> nn.Module:
    """The encoder of ``kind`` from its ``config`` (``encoder.config`` as checkpoints store it)."""
    from engine.models.convnext import ConvNeXt
    from engine.models.resnet import ResNet
    from engine.models.swin import SwinTransformer
    from engine.models.vit import VisionTransformer

    cls = {"vit": VisionTransformer, "resnet": ResNet, "convnext": ConvNeXt, "swin": SwinTransformer}[kind]
    c = dict(config)
    c.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("layers", "widths", "depths", "dims"):
        if key in c and isinstance(c[key], list):
            c[key] = tuple(c[key])
    return cls(**_accepted(cls, c))


# ------------------------------------------------------------------------------------------------ sources
@dataclasses.dataclass
class Source:
    """A pre-trained encoder: where from, its architecture and its weights (this engine's names)."""

    path: Path
    kind: str
    config: dict
    state_dict: dict
    method: str | None = None
    model: str | None = None
    image_size: int | None = None

    def backbone_spec(self) -> dict:
        return {"kind": self.kind, "config": _plain(self.config), "source": str(self.path),
                "source_method": self.method}


def _plain(obj):
    """JSON-able copy (tuples -> lists) so the spec survives a checkpoint and a YAML dump unchanged."""
    return json.loads(json.dumps(obj))


def _find_prefix(keys: list[str], wanted: list[str], hint: str | None) -> str | None:
    have = set(keys)
    cands = ([hint] if hint else []) + sorted({k[: -len(w)] for k in keys for w in wanted[:1] if k.endswith(w)})
    for p in cands:
        if p is not None and all(p + w in have for w in wanted):
            return p
    return None


def load_source(path: str | Path) -> Source:
    """The encoder of an ``engine.pretrain`` checkpoint (file or output folder; any method, also a fine-tuning
    run) or of an ``engine.export`` safetensors file. Raises FileNotFoundError, or CheckpointError (a
    ValueError) with one line naming the file."""
    from engine.trainer.checkpoint import CheckpointError

    p = Path(path)
    if p.suffix == ".safetensors":
        return _source_from_safetensors(p)
    from engine.eval import load_checkpoint

    state = load_checkpoint(p)
    file = p / "checkpoint-last.pt" if p.is_dir() else p
    cfg = state.get("config") or {}
    method = state.get("method") or cfg.get("method")
    if method == "dvae":
        raise CheckpointError(f"--checkpoint {file}: a --method dvae checkpoint is a tokenizer, not an encoder to "
                              "fine-tune")
    enc_cfg = state.get("encoder_config")
    if not enc_cfg:
        raise CheckpointError(f"--checkpoint {file}: no 'encoder_config' entry (not written by this engine's "
                              "trainer)")
    kind = kind_of(enc_cfg)
    if method == "finetune":
        kind = (cfg.get("backbone") or {}).get("kind", kind)
    try:
        probe = build_encoder(kind, enc_cfg) if method != "finetune" else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"--checkpoint {file}: cannot rebuild its encoder ({exc})") from None
    model_sd = state["model"]
    keys = list(model_sd)
    if probe is not None:
        wanted = list(probe.state_dict())
        prefix = _find_prefix(keys, wanted, ENCODER_PREFIX.get(method))
    else:
        prefix = "backbone."
    if prefix is None:
        raise CheckpointError(f"--checkpoint {file}: its weights hold no complete {kind} encoder of the stored "
                              "configuration")
    sd = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
    if method == "finetune":
        enc_cfg = (cfg.get("backbone") or {}).get("config") or enc_cfg
    return Source(file, kind, dict(enc_cfg), sd, method, cfg.get("model"), cfg.get("image_size"))


# timm names (engine.export) -> this engine's names
_FROM_TIMM = {
    "vit": [(r"^blocks\.(\d+)\.ls([12])\.gamma$", r"blocks.\1.gamma_\2"),
            (r"^blocks\.(\d+)\.attn\.relative_position_bias_table$",
             r"blocks.\1.rel_pos_bias.relative_position_bias_table")],
    "beit": [(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$",
              r"blocks.\1.rel_pos_bias.relative_position_bias_table")],
    "convnext": [(r"^stem\.([01])\.", r"downsample_layers.0.\1."),
                 (r"^stages\.(\d+)\.downsample\.([01])\.", r"downsample_layers.\1.\2."),
                 (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
                 (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
                 (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
                 (r"^stages\.(\d+)\.blocks\.(\d+)\.(norm\.|gamma$)", r"stages.\1.\2.\3"),
                 (r"^head\.norm\.", r"norm.")],
    "resnet": [],
    "swin": [],  # engine.models.swin uses timm's names already
}


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def _source_from_safetensors(path: Path) -> Source:
    from engine.trainer.checkpoint import CheckpointError

    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no file {path}")
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure: an unreadable file
        raise CheckpointError(f"--checkpoint {path}: not a readable safetensors file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    try:
        config = json.loads(meta.get("config") or "{}")
    except ValueError:
        config = {}
    layout = (meta.get("layout") or "").lower()
    if not config or layout not in ("vit", "beit", "resnet", "convnext", "swin"):
        raise CheckpointError(f"--checkpoint {path}: no engine.export metadata (layout {layout or 'missing'}, "
                              "config); export the checkpoint with python -m engine.export")
    kind = "vit" if layout in ("vit", "beit") else layout
    sd = {_rename(k, _FROM_TIMM[layout]): v for k, v in tensors.items()}
    try:
        probe = build_encoder(kind, config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"--checkpoint {path}: cannot rebuild its encoder ({exc})") from None
    target = probe.state_dict()
    if kind == "vit":  # a k bias exported as Beit's q/v biases: rebuild qkv.bias with k = 0 (the same function)
        for i in range(int(config.get("depth", 0))):
            key = f"blocks.{i}.attn.qkv.bias"
            q, v = sd.get(f"blocks.{i}.attn.q_bias"), sd.get(f"blocks.{i}.attn.v_bias")
            if key in target and key not in sd and q is not None and v is not None:
                sd[key] = torch.cat([q, torch.zeros_like(q), v])
                del sd[f"blocks.{i}.attn.q_bias"], sd[f"blocks.{i}.attn.v_bias"]
    if kind == "convnext":  # gamma = 1 added by the export for an encoder without layer scale
        for k in [k for k in sd if k.endswith(".gamma") and k not in target]:
            if bool((sd[k] == 1).all()):
                del sd[k]
    for k, t in target.items():  # non-persistent or dropped-at-export tensors: keep the encoder's own
        if k not in sd and k.endswith("mask_token"):
            sd[k] = t
    return Source(path, kind, config, sd, meta.get("method") or None, meta.get("model") or None,
                  int(config["img_size"]) if "img_size" in config else None)
