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
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from engine.timm_specs import _SPECS, ExportError, TimmSpec, register_timm_spec, timm_spec  # noqa: F401 - re-exported


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
