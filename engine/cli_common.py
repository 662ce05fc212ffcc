"""What the training command lines share (``engine.pretrain``, ``engine.finetune``): one-line errors with the
exit codes of :mod:`engine.exit_codes`, the output-folder reuse rule, SIGTERM/SIGINT handling, the data folder,
and running a :class:`engine.trainer.Trainer` with its failures mapped to exit codes."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from engine import exit_codes as codes
from engine.trainer.config import ConfigError


def fail(prog: str, message: str, code: int = codes.USAGE):
    """Print ``prog: error: message`` on one line to stderr and exit with ``code``."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse errors as one line and exit status 2 (argparse prints the usage too)."""
    parser.error = lambda message: fail(parser.prog, message)  # type: ignore[method-assign]
    return parser


def check_output_dir(cfg: dict, resume) -> None:
    """Refuse (ConfigError) to start a new run over a folder that holds a checkpoint, without --overwrite."""
    from engine.trainer.checkpoint import checkpoints_in
    from engine.trainer.loop import refuse_reuse_message

    out = Path(cfg["output_dir"])
    if cfg.get("overwrite") or not checkpoints_in(out):
        return
    if resume is not None and Path(resume).resolve().parent == out.resolve():
        return
    if resume is not None:
        raise ConfigError(f"--output-dir {out} holds another run's checkpoint while resuming from {resume}: give the "
                          "resumed run its own --output-dir, or --overwrite")
    raise ConfigError(refuse_reuse_message(out))


def find_resume_or_exit(cfg: dict, prog: str):
    """``--resume`` resolved (None, or the checkpoint to continue) after the output-folder check."""
    from engine.trainer import find_resume

    try:
        resume = find_resume(cfg["resume"], cfg["output_dir"])
        check_output_dir(cfg, resume)
    except FileNotFoundError as exc:
        fail(prog, str(exc), codes.CHECKPOINT)
    except ConfigError as exc:
        fail(prog, str(exc))
    return resume


def install_stop_handlers(trainer) -> None:
    """SIGTERM/SIGINT (how SLURM, Kubernetes and Ctrl-C stop a job): checkpoint at the next step boundary and
    exit with status 75; a second SIGINT aborts at once."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if trainer._stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(name)
        if trainer.dist.is_main:
            print(f"{name} received: saving a checkpoint at the end of this step (Ctrl-C again aborts)", flush=True)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


def data_dir_or_exit(cfg: dict, dist, prog: str) -> Path:
    """``--data``, or the built-in digits dataset (written by rank 0 first, then read by every rank)."""
    from engine.trainer.distributed import barrier

    try:
        if cfg["data"] is None:
            from engine.data import builtin_dataset

            if dist.is_main:
                builtin_dataset(image_size=cfg["image_size"])
            barrier()
            return Path(builtin_dataset(image_size=cfg["image_size"]))
        return Path(cfg["data"])
    except OSError as exc:
        fail(prog, f"data: {exc}", codes.DATA)


def fit_or_exit(trainer, cfg: dict, dist, prog: str, resume) -> dict:
    """``trainer.fit(resume)``, its failures turned into one-line errors and exit codes (non-finite 3,
    checkpoint 5, output folder 2, a stopped peer rank 6). A pre-emption returns the summary
    (``summary["preempted"]``): see :func:`report_preempted`."""
    from engine.trainer import NonFiniteLossError
    from engine.trainer.checkpoint import CheckpointError
    from engine.trainer.distributed import is_timeout_error
    from engine.trainer.loop import OutputDirError

    install_stop_handlers(trainer)
    try:
        return trainer.fit(resume=resume)
    except NonFiniteLossError as exc:
        fail(prog, str(exc), codes.NON_FINITE)
    except CheckpointError as exc:
        fail(prog, str(exc), codes.CHECKPOINT)
    except OutputDirError as exc:
        fail(prog, str(exc))
    except RuntimeError as exc:
        if dist.enabled and is_timeout_error(exc):
            first = str(exc).strip().splitlines()[0][:200]
            fail(prog, f"rank {dist.rank}: a peer rank stopped answering for --dist-timeout "
                       f"{cfg['dist_timeout']:g} s ({first}); the last checkpoint is "
                       f"{trainer._last_finite_text()}; restart the job with --resume", codes.DISTRIBUTED)
        raise


def report_preempted(trainer, summary: dict, dist) -> int:
    """The pre-emption message (rank 0) and exit status 75."""
    from engine.trainer.distributed import cleanup

    if dist.is_main:
        print(f"pre-empted ({summary['preempted']}) at step {summary['step']}/{summary['total_steps']}: "
              f"checkpoint {trainer.last_checkpoint} saved; continue with the same command and --resume", flush=True)
    cleanup()
    return codes.PREEMPTED


def write_run_config(cfg: dict, dist) -> None:
    """``output_dir/config.yaml`` (rank 0): the resolved configuration with each value's source."""
    from engine.trainer.config import dump_config

    if dist.is_main:
        out_dir = Path(cfg["output_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
