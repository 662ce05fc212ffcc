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

import sys
from pathlib import Path

from engine import exit_codes as codes
from engine.cli_common import check_output_dir, fail as _fail
from engine.cli_common import install_stop_handlers as _install_stop_handlers
from engine.cli_common import one_line_errors as _one_line_errors
from engine.trainer.config import ConfigError, build_parser, dump_config, resolve
from engine.trainer.loop import OutputDirError


def build_loader(cfg: dict, method, data_dir, dist) -> object:
    from engine.data import build_pretrain_loader

    kw = dict(method.loader_kwargs())
    if cfg.get("crop_scale") is not None:
        kw["crop_scale"] = tuple(cfg["crop_scale"])
    # a tokenizer method (dvae, vqkd) reuses the augmentation recipe named by its ``loader_method``
    return build_pretrain_loader(
        getattr(method, "loader_method", None) or cfg["method"], str(data_dir), batch_size=cfg["batch_size"], image_size=cfg["image_size"], seed=cfg["seed"],
        shard_id=dist.rank, num_shards=dist.world_size, num_threads=cfg["num_threads"],
        device="gpu" if dist.device.type == "cuda" else "cpu", **kw)


def final_knn(cfg: dict, method, data_dir, device) -> dict[str, float]:
    from engine.eval import knn_eval, random_encoder_like

    kw = dict(image_size=cfg["image_size"], device=device, pool=cfg.get("pool"), k=cfg["knn_k"],
              temperature=cfg["knn_t"], num_threads=cfg["num_threads"])
    pre = knn_eval(method.encoder(), data_dir, **kw)
    rnd = knn_eval(random_encoder_like(cfg, seed=cfg["seed"] + 1000).to(device), data_dir, **kw)
    return {"pretrained": pre["knn_top1"], "random_init": rnd["knn_top1"]}


def check_method_options(method) -> None:
    """Build one mask of the method's recipe now, so that a bad mask option fails before any training."""
    fn = method.loader_kwargs().get("mask_fn")
    if fn is not None:
        fn(1, 0)


def main(argv=None) -> int:
    parser = _one_line_errors(build_parser())
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
    from engine.trainer import Trainer, NonFiniteLossError, find_resume, init_distributed, seed_everything
    from engine.trainer.checkpoint import CheckpointError
    from engine.trainer.distributed import barrier, cleanup, is_timeout_error

    try:
        resume = find_resume(cfg["resume"], cfg["output_dir"])
        check_output_dir(cfg, resume)
    except FileNotFoundError as exc:
        _fail(prog, str(exc), codes.CHECKPOINT)
    except ConfigError as exc:
        _fail(prog, str(exc))
    try:
        dist = init_distributed(cfg["device"], timeout_s=cfg["dist_timeout"])
    except ValueError as exc:
        _fail(prog, str(exc))
    seed_everything(cfg["seed"] + dist.rank)
    try:
        if cfg["data"] is None:
            from engine.data import builtin_dataset

            data_dir = builtin_dataset(image_size=cfg["image_size"]) if dist.is_main else None
            barrier()
            data_dir = builtin_dataset(image_size=cfg["image_size"])
        else:
            data_dir = Path(cfg["data"])
    except OSError as exc:
        _fail(prog, f"data: {exc}", codes.DATA)
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
        out_dir = Path(cfg["output_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
    _install_stop_handlers(trainer)
    try:
        summary = trainer.fit(resume=resume)
    except NonFiniteLossError as exc:
        _fail(prog, str(exc), codes.NON_FINITE)
    except CheckpointError as exc:
        _fail(prog, str(exc), codes.CHECKPOINT)
    except OutputDirError as exc:
        _fail(prog, str(exc))
    except RuntimeError as exc:
        if dist.enabled and is_timeout_error(exc):
            first = str(exc).strip().splitlines()[0][:200]
            _fail(prog, f"rank {dist.rank}: a peer rank stopped answering for --dist-timeout "
                        f"{cfg['dist_timeout']:g} s ({first}); the last checkpoint is "
                        f"{trainer._last_finite_text()}; restart the job with --resume", codes.DISTRIBUTED)
        raise
    if summary.get("preempted"):
        if dist.is_main:
            print(f"pre-empted ({summary['preempted']}) at step {summary['step']}/{summary['total_steps']}: "
                  f"checkpoint {trainer.last_checkpoint} saved; continue with the same command and --resume",
                  flush=True)
        cleanup()
        return codes.PREEMPTED
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
