"""``python -m engine.visualize``: pictures of what a pre-training run learned (PNG files; paths printed).

::

    python -m engine.visualize reconstruction --checkpoint PATH [--data DIR] [--out DIR] [--num-images N]
    python -m engine.visualize attention      --checkpoint PATH ...     (any ViT encoder: dino, beit, simmim, ...)
    python -m engine.visualize tokens         --checkpoint PATH ...     (dvae, vqkd)
    python -m engine.visualize curves         --log A --log B | --checkpoint A --checkpoint B

``--checkpoint`` is a checkpoint file or output folder of ``engine.pretrain``; ``--data`` defaults to the run's
data (or the built-in dataset); ``--out`` defaults to ``<run folder>/viz``. ``curves`` takes several runs
(``--log``/``--checkpoint`` repeated: log files, output folders or checkpoints) and draws them in one plot.
Exit status: 0 success, 2 bad arguments (missing checkpoint, a kind the checkpoint's method cannot produce,
...), with a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m engine.visualize"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from engine.viz import KINDS

    p = _Parser(prog=PROG, description="pictures of a pre-training run (PNG)")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="checkpoint file or output folder (repeat for several runs with 'curves')")
    p.add_argument("--log", action="append", default=[], help="log.jsonl of a run ('curves'; repeatable)")
    p.add_argument("--label", action="append", default=[], help="legend label per run ('curves'; repeatable)")
    p.add_argument("--data", help="image folder (default: the run's data, else the built-in dataset)")
    p.add_argument("--out", help="output folder (default: <run folder>/viz)")
    p.add_argument("--num-images", type=int, default=4, help="validation images per picture (default 4)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks ('reconstruction')")
    return p


def _default_out(source) -> Path:
    p = Path(source)
    return (p if p.is_dir() else p.parent) / "viz"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from engine import exit_codes
    from engine.trainer.checkpoint import CheckpointError
    from engine.viz import VizError, render
    from engine.viz.curves import render as render_curves

    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    try:
        if args.kind == "curves":
            sources = list(args.log) + list(args.checkpoint)
            if not sources:
                parser.error("curves needs at least one --log or --checkpoint")
            paths = render_curves(sources, args.out or _default_out(sources[0]), labels=args.label or None)
        else:
            if args.log:
                parser.error(f"--log is only for 'curves', not {args.kind!r}")
            if len(args.checkpoint) != 1:
                parser.error(f"{args.kind} needs exactly one --checkpoint, got {len(args.checkpoint)}")
            ckpt = args.checkpoint[0]
            if not Path(ckpt).exists():
                parser.error(f"--checkpoint: no checkpoint at {ckpt}")
            from engine.trainer.distributed import resolve_device

            try:
                device = resolve_device(args.device)
            except (ValueError, RuntimeError) as exc:
                parser.error(str(exc))
            paths = render(args.kind, ckpt, args.out or _default_out(ckpt), data_dir=args.data,
                           num_images=args.num_images, device=device, seed=args.seed)
    except CheckpointError as exc:
        parser.exit(exit_codes.CHECKPOINT, f"{parser.prog}: error: {exc}\n")
    except VizError as exc:
        parser.error(str(exc).replace("\n", " "))
    for p in paths:
        print(p, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
