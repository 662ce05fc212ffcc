"""Pictures of what a pre-training run learned (``python -m engine.visualize``).

One module per kind: :mod:`~engine.viz.reconstruction` (SimMIM, SparK), :mod:`~engine.viz.attention` (any ViT
encoder: DINO, BEiT, ...), :mod:`~engine.viz.tokens` (dVAE, VQ-KD tokenizers), :mod:`~engine.viz.curves`
(training logs). matplotlib is imported only when a picture is drawn (headless Agg backend).
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.viz.common import VizError

KINDS = ("reconstruction", "attention", "tokens", "curves")
# the picture of the default job per method (curves are drawn for every method)
METHOD_PICTURE = {"simmim": "reconstruction", "spark": "reconstruction", "dino": "attention", "beit": "attention",
                  "beitv2": "attention", "dvae": "tokens", "vqkd": "tokens"}


def render(kind: str, checkpoint, out_dir, data_dir=None, num_images: int = 4, device="cpu", seed: int = 0):
    """Write the pictures of ``kind`` for a checkpoint (file or output folder); return their paths."""
    if kind == "reconstruction":
        from engine.viz import reconstruction as mod
    elif kind == "attention":
        from engine.viz import attention as mod
    elif kind == "tokens":
        from engine.viz import tokens as mod
    elif kind == "curves":
        from engine.viz import curves

        return curves.render([checkpoint], out_dir)
    else:
        raise VizError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return mod.render(checkpoint, out_dir, data_dir=data_dir, num_images=num_images, device=device, seed=seed)


def default_job_pictures(method_name: str, checkpoint_path, output_dir, data_dir=None) -> list[Path]:
    """The end-of-job pictures: the training curves and the method's picture (reconstruction for
    simmim/spark, attention for the dino/beit/beitv2 ViTs, tokens for dvae/vqkd) in ``output_dir``.

    A picture that cannot be drawn is reported on stderr and skipped (a finished training run is never failed
    by its pictures); returns the paths written."""
    out: list[Path] = []
    jobs = [("curves", checkpoint_path)]
    kind = METHOD_PICTURE.get(method_name)
    if kind is not None:
        jobs.append((kind, checkpoint_path))
    for kind, ckpt in jobs:
        try:
            out += render(kind, ckpt, output_dir, data_dir=data_dir)
        except Exception as exc:  # noqa: BLE001 - pictures are a by-product of the job
            print(f"engine.viz: {kind} picture skipped: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return out


__all__ = ["KINDS", "METHOD_PICTURE", "VizError", "default_job_pictures", "render"]
