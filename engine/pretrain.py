"""``python -m engine.pretrain``: self-supervised pre-training of a ViT.

With no arguments it runs the small CPU preset (``engine/configs/default.yaml``: SimMIM, vit_pico, 32-px
built-in digits, 20 epochs) in a few minutes and prints, as its last line, the k-NN top-1 (percent,
built-in val split, mean-pooled features) of the pre-trained encoder next to a randomly initialised one::

    knn_top1 pretrained=49.6 random_init=47.1

Presets: ``--config NAME`` (a file in engine/configs/ or a path); any key can be overridden by its flag.
Learning rate: ``--lr`` (absolute) or ``--blr`` with the linear scaling rule
``lr = blr * batch_size * world_size * accum_steps / 256``.
Distributed: ``torchrun --nproc_per_node N -m engine.pretrain ...`` (DDP; NCCL on GPU, gloo on CPU).
Resume: ``--resume`` (the output folder's last checkpoint) or ``--resume PATH``; the run continues exactly.
Output folder: a folder that holds a checkpoint is only reused with ``--resume`` (continue) or ``--overwrite``.
Pre-emption: SIGTERM/SIGINT save a checkpoint at the next step boundary and exit with status 75.
Exit status (``engine/exit_codes.py``): 0 success, 1 internal error, 2 bad arguments/configuration, 3 stopped
on non-finite values, 4 data error, 5 checkpoint error, 6 a peer rank stopped answering, 75 pre-empted.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from engine import exit_codes as codes
from engine.cli_common import (data_dir_or_exit, fail as _fail, find_resume_or_exit, fit_or_exit, one_line_errors,
                               report_preempted, write_run_config)
from engine.trainer.config import ConfigError, build_parser, dump_config, resolve


def build_loader(cfg: dict, method, data_dir, dist) -> object:
    """The pre-training loader of ``method``'s data recipe (``--crop-scale`` replacing its crop scale)."""
    from engine.data import LoaderOptions, build_pretrain_loader

    recipe = method.data_recipe()
    if cfg.get("crop_scale") is not None:
        recipe = dataclasses.replace(recipe, crop_scale=tuple(cfg["crop_scale"]))
    options = LoaderOptions(batch_size=cfg["batch_size"], seed=cfg["seed"], shard_id=dist.rank,
                            num_shards=dist.world_size, num_threads=cfg["num_threads"],
                            device="gpu" if dist.device.type == "cuda" else "cpu")
    return build_pretrain_loader(recipe, str(data_dir), image_size=cfg["image_size"], options=options)


def final_knn(cfg: dict, method, data_dir, device) -> dict[str, float]:
    from engine.eval import knn_eval, random_encoder_like

    kw = dict(image_size=cfg["image_size"], device=device, pool=cfg.get("pool"), k=cfg["knn_k"],
              temperature=cfg["knn_t"], num_threads=cfg["num_threads"])
    pre = knn_eval(method.encoder(), data_dir, **kw)
    rnd = knn_eval(random_encoder_like(cfg, seed=cfg["seed"] + 1000).to(device), data_dir, **kw)
    return {"pretrained": pre["knn_top1"], "random_init": rnd["knn_top1"]}


def check_method_options(method) -> None:
    """Build one mask of the method's recipe now, so that a bad mask option fails before any training."""
    fn = method.mask_fn()
    if fn is not None:
        fn(1, 0)


def main(argv=None) -> int:
    """The command line (``argv``: its arguments, default ``sys.argv[1:]``); returns the exit status, or exits
    with it (``SystemExit``) on an error. Any method registered in this process can be run."""
    parser = one_line_errors(build_parser())
    prog = parser.prog
    args = vars(parser.parse_args(argv))
    from engine.methods import UnknownMethodError, build_method, get_method

    try:
        cfg = resolve(args, method_defaults_fn=lambda m: get_method(m).defaults)
    except (ConfigError, UnknownMethodError) as exc:
        _fail(prog, str(exc))
    if args.get("print_config"):
        print(dump_config(cfg), end="")
        return codes.OK
    from engine.trainer import Trainer, init_distributed, seed_everything
    from engine.trainer.distributed import barrier, cleanup

    resume = find_resume_or_exit(cfg, prog)
    try:
        dist = init_distributed(cfg["device"], timeout_s=cfg["dist_timeout"])
    except ValueError as exc:
        _fail(prog, str(exc))
    seed_everything(cfg["seed"] + dist.rank)
    data_dir = data_dir_or_exit(cfg, dist, prog)
    try:
        method = build_method(cfg["method"], cfg)
        check_method_options(method)
    except (ValueError, TypeError) as exc:
        _fail(prog, f"--method {cfg['method']}: {exc}")
    try:
        loader = build_loader(cfg, method, data_dir, dist)
    except (ValueError, OSError) as exc:
        _fail(prog, f"data: {exc}", codes.DATA)
    eval_fn = None
    if cfg["eval_every"] and (Path(data_dir) / "val").is_dir():
        from engine.eval import knn_eval

        def eval_fn(encoder):
            return knn_eval(encoder, data_dir, image_size=cfg["image_size"], device=dist.device,
                            pool=cfg.get("pool"), k=cfg["knn_k"], temperature=cfg["knn_t"])
    try:
        trainer = Trainer(method, loader, cfg, dist, eval_fn=eval_fn)
    except ValueError as exc:
        _fail(prog, str(exc))
    if dist.is_main:
        print(f"method {cfg['method']}  model {cfg['model']}  data {data_dir}  steps {trainer.total_steps} "
              f"({trainer.steps_per_epoch}/epoch)  lr {trainer.lr:.3g}  batch {cfg['batch_size']}x"
              f"{dist.world_size}x{cfg['accum_steps']}  precision {cfg['precision']}  device {dist.device}"
              + (f"  resume {resume}" if resume else ""), flush=True)
    write_run_config(cfg, dist)
    summary = fit_or_exit(trainer, cfg, dist, prog, resume)
    if summary.get("preempted"):
        return report_preempted(trainer, summary, dist)
    if dist.is_main:
        print(f"trained {summary['step']}/{summary['total_steps']} steps in {summary['seconds']:.1f}s; "
              f"checkpoint {trainer.last_checkpoint}", flush=True)
    if not summary["stopped"] and dist.is_main and trainer.last_checkpoint.exists():
        from engine.viz import default_job_pictures

        pictures = default_job_pictures(cfg["method"], trainer.last_checkpoint, Path(cfg["output_dir"]) / "viz",
                                        data_dir)
        for path in pictures:
            print(f"picture {path}", flush=True)
    if not summary["stopped"] and cfg["final_knn"] and dist.is_main and (Path(data_dir) / "val").is_dir():
        res = final_knn(cfg, method, data_dir, dist.device)
        print(f"knn_top1 pretrained={res['pretrained']:.1f} random_init={res['random_init']:.1f}", flush=True)
    barrier()
    cleanup()
    return codes.OK


if __name__ == "__main__":
    sys.exit(main())
