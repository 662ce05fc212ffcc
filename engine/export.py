"""Export a pre-trained backbone as safetensors with timm-compatible parameter names.

    python -m engine.export --checkpoint output/pretrain --out vit.safetensors

Plain ViT encoders (absolute position embedding, q/k/v bias) map onto ``timm``'s ``VisionTransformer``
(``blocks.i.ls1.gamma`` for layer scale); BEiT-style encoders (q/v bias, relative position bias) onto
``timm``'s ``Beit`` (``blocks.i.gamma_1``, ``blocks.i.attn.relative_position_bias_table``,
``rel_pos_bias.relative_position_bias_table`` when shared). Pre-training-only tensors (the mask token) and
non-persistent index buffers are not exported. Load into timm with ``num_classes=0`` (no classifier head).
The safetensors metadata holds the encoder config (JSON) and the matching timm layout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

_DROP = ("mask_token",)


def timm_layout(encoder: nn.Module) -> str:
    cfg = getattr(encoder, "config", {})
    beit = bool(cfg.get("qv_bias") or cfg.get("use_rel_pos_bias") or cfg.get("use_shared_rel_pos_bias"))
    return "beit" if beit else "vit"


def timm_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's parameters and persistent buffers under timm names (contiguous CPU tensors)."""
    layout = timm_layout(encoder)
    out: dict[str, torch.Tensor] = {}
    for name, t in encoder.state_dict().items():
        if name.split(".")[-1] in _DROP or name.endswith("relative_position_index"):
            continue
        new = name
        new = re.sub(r"^blocks\.(\d+)\.rel_pos_bias\.relative_position_bias_table$",
                     r"blocks.\1.attn.relative_position_bias_table", new)
        if layout == "vit":
            new = re.sub(r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma", new)
        if new in out:
            raise ValueError(f"export: two tensors map onto {new!r}")
        out[new] = t.detach().to("cpu").contiguous()
    return out


def timm_model_name(encoder: nn.Module) -> str:
    cfg = getattr(encoder, "config", {})
    sizes = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
    size = sizes.get(cfg.get("embed_dim"), f"d{cfg.get('embed_dim')}")
    prefix = "beit" if timm_layout(encoder) == "beit" else "vit"
    return f"{prefix}_{size}_patch{cfg.get('patch_size')}_{cfg.get('img_size')}"


def export(encoder: nn.Module, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "layout": timm_layout(encoder), "timm_model": timm_model_name(encoder),
            "config": json.dumps(getattr(encoder, "config", {}), sort_keys=True)}
    tmp = out.with_name(out.name + ".tmp")
    save_file(timm_state_dict(encoder), str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.splitlines()[0])
    p.error = lambda m: p.exit(2, f"{p.prog}: error: {m}\n")  # type: ignore[method-assign]
    p.add_argument("--checkpoint", required=True, help="checkpoint file or output folder of engine.pretrain")
    p.add_argument("--out", required=True, help="output .safetensors file")
    args = p.parse_args(argv)
    from engine.eval import encoder_from_checkpoint, load_checkpoint

    try:
        state = load_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        p.error(str(exc))
    encoder, _ = encoder_from_checkpoint(state)
    path = export(encoder, args.out)
    print(f"wrote {path} ({timm_model_name(encoder)} layout {timm_layout(encoder)}, "
          f"{len(timm_state_dict(encoder))} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
