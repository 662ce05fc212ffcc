"""The generic training loop.

One optimizer step = ``accum_steps`` micro-batches. Before each step the precomputed schedules (lr, weight
decay, method schedules such as EMA momentum) are read at index ``step`` and written into the optimizer's
param groups and the method. A step is::

    forward under autocast -> loss / accum -> (scaled) backward          x accum_steps (DDP no_sync between)
    method.after_backward -> unscale -> gradient norm -> all-ranks check: loss and gradient norm finite,
    stop requested -> clip -> optimizer step -> method.after_step

Non-finite values: a NaN/Inf loss or gradient norm (any rank) stops the run *before* the optimizer step with
:class:`NonFiniteLossError`, whose message names the last checkpoint that is really finite; with
``skip_nonfinite = N`` up to N such steps are skipped (no update, logged) first. Under fp16 a finite loss with
overflowing gradients is the GradScaler's normal scale search: the step is skipped and the scale lowered, not
counted, as long as the scale stays >= 1. A checkpoint is never written from non-finite parameters or
optimizer state (:class:`NonFiniteLossError` instead).

Output folder: nothing in it is deleted or replaced before the first optimizer step of the run has succeeded
(a fresh run's old ``log.jsonl`` is dropped then; a resumed run's log is cut back to the resumed step).

Checkpoints (rank 0, atomic, checksummed) hold everything needed to continue the exact same run: model,
optimizer, grad scaler, step (= schedule position), every rank's RNG states, the data loader position and,
with ``--model-ema``, the weight EMA (:mod:`engine.trainer.model_ema`, updated after every optimizer step,
evaluated beside the model with its keys suffixed ``_ema``). They are written every ``--save-every-epochs``
epochs (default 1), every ``--save-every`` steps, at the end, before an evaluation that may keep the best
(``checkpoint-best.pt`` is then a copy of exactly the evaluated weights) and on a stop request.
:meth:`Trainer.request_stop` (called by the CLI's SIGTERM/SIGINT handler) makes the run save a checkpoint at
the next step boundary and return with ``summary["preempted"]`` set; all ranks agree on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from engine.trainer import checkpoint as ckpt
from engine.trainer.config import peak_lr
from engine.trainer.distributed import DistInfo, all_gather_object, all_reduce_, all_reduce_mean
from engine.trainer.logging import MetricLogger
from engine.trainer.optim import build_optimizer
from engine.trainer.schedules import cosine_schedule

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_size_of(batch: dict) -> int:
    if "images" in batch:
        return int(batch["images"].shape[0])
    if "crops" in batch:
        return int(batch["crops"][0].shape[0])
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])


class Trainer:
    def __init__(self, method: nn.Module, loader, cfg: dict, dist: DistInfo | None = None,
                 eval_fn: Callable[[nn.Module], dict] | None = None, logger: MetricLogger | None = None):
        self.cfg = cfg
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.method = method.to(self.device)
        self.loader = loader
        self.eval_fn = eval_fn
        self.output_dir = Path(cfg["output_dir"])
        self.accum = int(cfg.get("accum_steps", 1))
        self.steps_per_epoch = len(loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the loader gives {len(loader)} batches per epoch, fewer than --accum-steps "
                             f"{self.accum}: use a smaller --batch-size or more data")
        planned = int(cfg["epochs"]) * self.steps_per_epoch
        self.total_steps = int(cfg.get("max_steps") or planned)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        if self.dist.enabled and getattr(self.method, "sync_batchnorm", False):
            self.method.convert_sync_batchnorm()  # before DDP, the EMA copy and the optimizer: SyncBN
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.method, device_ids=ids,
                             find_unused_parameters=bool(getattr(method, "ddp_find_unused_parameters", False)))
        else:
            self.model = self.method
        self.ema = None  # weight EMA (--model-ema): a separate fp32 copy, never a submodule, never seen by DDP;
        if cfg.get("model_ema"):  # made after DDP has broadcast rank 0's weights, so every rank's is the same
            from engine.trainer.model_ema import ModelEma

            decay = cfg.get("model_ema_decay")
            self.ema = ModelEma(self.method, 0.9999 if decay is None else float(decay),
                                warmup=bool(cfg.get("model_ema_warmup")))
        # a method may define its own parameter groups (e.g. fine-tuning's layer-wise lr decay: "lr_scale")
        groups = self.method.optimizer_groups() if hasattr(self.method, "optimizer_groups") else None
        self.optimizer = build_optimizer(self.method, cfg.get("optimizer", "adamw"),
                                         (cfg.get("beta1", 0.9), cfg.get("beta2", 0.999)), groups=groups)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.precision = cfg.get("precision", "fp32")
        self.amp_dtype = PRECISIONS[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.lr = peak_lr(cfg, self.dist.world_size)
        warm = int(round(float(cfg["warmup_epochs"]) * self.steps_per_epoch))
        self.schedules: dict[str, np.ndarray] = {
            "lr": cosine_schedule(self.lr, float(cfg["min_lr"]), self.total_steps, warm),
            "wd": cosine_schedule(float(cfg["weight_decay"]), float(cfg["weight_decay_end"]), self.total_steps),
        }
        self.schedules.update(self.method.schedules(self.total_steps, self.steps_per_epoch))
        self.logger = logger or MetricLogger(self.output_dir, enabled=self.dist.is_main,
                                             print_every=cfg.get("print_every", 10))
        self.step = 0
        self.history: list[float] = []  # local loss per optimizer step of this process
        self.skipped_nonfinite = 0
        self.last_finite: tuple[Path, int] | None = None  # (checkpoint, step) known to hold finite state
        self._stop_reason: str | None = None
        self._stop_agreed = False
        self._step_time = 0.0
        self.saved_step: int | None = None  # the step of checkpoint-last.pt written by this process
        self.last_eval: tuple[int, dict] | None = None  # (step, result) of the latest evaluation

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / ckpt.LAST

    def _last_finite_text(self) -> str:
        if self.last_finite is None:
            return "none written yet"
        path, step = self.last_finite
        return f"{path} (step {step})"

    def state_dict(self) -> dict:
        rng = ckpt.rng_state()
        per_rank = all_gather_object({"rng": rng, "history": list(self.history)})
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "total_steps": self.total_steps,
            "rng": rng,
            "rng_per_rank": [r["rng"] for r in per_rank],
            "history_per_rank": [r["history"] for r in per_rank],
            "world_size": self.dist.world_size,
            "loader": self.loader.state_dict(),
            "config": {k: v for k, v in self.cfg.items() if not k.startswith("_")},
            "method": self.cfg.get("method"),
            "encoder_config": dict(getattr(self.method.encoder(), "config", {})),
            "history": list(self.history),
            **({"model_ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def _check_state_finite(self) -> None:
        bad = ckpt.non_finite_tensors(self.method.state_dict())
        bad += ckpt.optimizer_non_finite(self.optimizer.state_dict())
        if self.ema is not None:
            bad += [f"model_ema.{k}" for k in ckpt.non_finite_tensors(self.ema.module.state_dict())]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NonFiniteLossError(
                f"non-finite parameters or optimizer state at step {self.step} ({shown}); no checkpoint written. "
                f"Last finite checkpoint: {self._last_finite_text()}. Try a lower --lr/--blr, --clip-grad, or "
                "--precision bf16/fp32, then --resume from that checkpoint.")

    def save(self) -> Path | None:
        """Checkpoint (every rank takes part: RNG states are gathered); written by rank 0 only."""
        self._check_state_finite()
        state = self.state_dict()
        self.saved_step = self.step
        if not self.dist.is_main:
            return None
        path = ckpt.save_atomic(state, self.last_checkpoint)
        self.last_finite = (path, self.step)
        return path

    def load(self, path: str | Path) -> None:
        try:
            state = ckpt.load(path, map_location="cpu")
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"--resume {exc}") from None
        for key in ("model", "optimizer", "step"):
            if key not in state:
                raise ckpt.CheckpointError(f"--resume {path}: not a training checkpoint of engine.pretrain "
                                           f"(no {key!r} entry)")
        self._check_same_run(state, path)
        if state.get("total_steps") != self.total_steps:
            raise ckpt.CheckpointError(
                f"--resume {path}: checkpoint plans {state.get('total_steps')} steps, this run "
                f"{self.total_steps}; resume with the same --epochs/--max-steps/--batch-size")
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ckpt.CheckpointError(f"--resume {path}: its weights do not fit this run's model ({first})") from None
        self.scaler.load_state_dict(state["scaler"])
        self._load_ema(state, path)
        self.step = int(state["step"])
        self.saved_step = self.step
        self.history = list(state.get("history", []))[: self.step]
        self.loader.load_state_dict(state["loader"])
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) == self.dist.world_size:
            ckpt.set_rng_state(per_rank[self.dist.rank])
            self.history = list(state.get("history_per_rank", [self.history] * len(per_rank))[self.dist.rank])
        else:
            if self.dist.world_size > 1 and self.dist.is_main:
                print(f"warning: {path} was written by {len(per_rank or [0])} rank(s), this run has "
                      f"{self.dist.world_size}: every rank continues from rank 0's RNG state (not bitwise "
                      "the same run)", flush=True)
            ckpt.set_rng_state(state["rng"])
        self.last_finite = (Path(path), self.step) if not ckpt.non_finite_tensors(state["model"]) else None
        self.logger.truncate(self.step)

    def _load_ema(self, state: dict, path) -> None:
        if self.ema is None:
            return
        if "model_ema" not in state:  # a run that had none: the EMA starts from the resumed weights
            self.ema.module.load_state_dict(self.method.state_dict())
            if self.dist.is_main:
                print(f"warning: {path} has no model EMA (--model-ema was off): the EMA starts from its weights",
                      flush=True)
            return
        try:
            self.ema.load_state_dict(state["model_ema"])
        except ValueError as exc:
            raise ckpt.CheckpointError(f"--resume {path}: {exc}") from None

    def _check_same_run(self, state: dict, path) -> None:
        diffs = []
        method = self.cfg.get("method")
        if state.get("method") not in (None, method):
            diffs.append(f"--method {state.get('method')} (this run: {method})")
        theirs = state.get("encoder_config") or {}
        ours = dict(getattr(self.method.encoder(), "config", {}))
        for key in sorted(set(theirs) | set(ours)):
            if key in theirs and key in ours and theirs[key] != ours[key]:
                diffs.append(f"{key}={theirs[key]} (this run: {ours[key]})")
        if diffs:
            raise ckpt.CheckpointError(f"--resume {path}: the checkpoint is of another run: " + ", ".join(diffs)
                                       + "; resume with the run's own options, or start a new run in another "
                                         "--output-dir")

    # ------------------------------------------------------------------------------------------ one step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _apply_schedules(self, epoch: int) -> dict[str, float]:
        values = {k: float(v[self.step]) for k, v in self.schedules.items()}
        for g in self.optimizer.param_groups:
            g["lr"] = values["lr"] * g.get("lr_scale", 1.0)
            g["weight_decay"] = values["wd"] if g.get("apply_wd", True) else 0.0
        self.method.set_progress(self.step, epoch, values)
        return values

    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Ask the run to checkpoint and return at the next step boundary (safe from a signal handler)."""
        self._stop_reason = reason

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)

    def train_step(self, batches, epoch: int) -> dict[str, float]:
        values = self._apply_schedules(epoch)
        self.model.train()
        metrics_sum: dict[str, torch.Tensor] = {}
        images = 0
        for i, batch in enumerate(batches):
            batch = to_device(batch, self.device)
            images += batch_size_of(batch)
            sync = contextlib.nullcontext()
            if self.dist.enabled and i < len(batches) - 1:
                sync = self.model.no_sync()
            with sync:
                with self._autocast():
                    out = self.model(batch)
                loss = out["loss"]
                self.scaler.scale(loss.float() / len(batches)).backward()
            for k, v in out.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                metrics_sum[k] = metrics_sum.get(k, 0) + v / len(batches)
        self.method.after_backward()
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16
        grad_norm = self._grad_norm()
        # one all-reduce: [loss or grad norm non-finite, gradients overflowed (fp16), stop requested]
        loss_bad = not bool(torch.isfinite(metrics_sum["loss"]))
        flags = torch.tensor([float(loss_bad), float(not bool(torch.isfinite(grad_norm))),
                              float(self._stop_reason is not None)], device=self.device)
        all_reduce_(flags, op="max")
        loss_bad, grad_bad, stop = (bool(f) for f in flags.tolist())
        self._stop_agreed = stop
        metrics = {k: float(v) for k, v in metrics_sum.items()}
        metrics["lr"], metrics["wd"] = values["lr"], values["wd"]
        metrics["grad_norm"] = float(grad_norm)
        metrics["_images"] = images * self.dist.world_size
        if loss_bad or grad_bad:
            fp16_overflow = (self.scaler.is_enabled() and not loss_bad and self.scaler.get_scale() >= 1.0)
            what = (f"non-finite loss ({metrics['loss']})" if loss_bad
                    else f"non-finite gradient norm ({metrics['grad_norm']}; loss {metrics['loss']:.4g})")
            if fp16_overflow or self.skipped_nonfinite < int(self.cfg.get("skip_nonfinite") or 0):
                if not fp16_overflow:
                    self.skipped_nonfinite += 1
                if self.scaler.is_enabled():
                    self.scaler.update()  # lowers the scale after an overflow
                self.optimizer.zero_grad(set_to_none=True)
                if self.dist.is_main:
                    note = ("fp16 overflow, loss scale now "
                            f"{self.scaler.get_scale():g}" if fp16_overflow else
                            f"skipped {self.skipped_nonfinite}/{self.cfg.get('skip_nonfinite')} (--skip-nonfinite)")
                    print(f"warning: {what} at step {self.step}: optimizer step skipped ({note})", flush=True)
                metrics["skipped"] = 1.0
                return metrics
            raise NonFiniteLossError(
                f"{what} at step {self.step} (epoch {epoch}); stopped before the optimizer step. Last finite "
                f"checkpoint: {self._last_finite_text()}. Try a lower --lr/--blr, --clip-grad, "
                "--precision bf16/fp32, or --skip-nonfinite N to skip a few such steps.")
        clip = float(self.cfg.get("clip_grad") or 0.0)
        if clip > 0:  # the method's own rule (global norm by default, per parameter for DINO)
            clip_fn = getattr(self.method, "clip_gradients", None)
            if clip_fn is None:
                torch.nn.utils.clip_grads_with_norm_(self.params, clip, grad_norm)
            else:
                clip_fn(self.params, clip, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step()
        if self.ema is not None:
            self.ema.update(self.method)
        return metrics

    # ------------------------------------------------------------------------------------------ the run
    @staticmethod
    def _next_batch(it):
        """``next(it)`` without letting the loader touch the global RNG streams (a torch DataLoader draws
        its base seed when first iterated): batches are keyed by (seed, epoch, rank, step) anyway, and the
        model's random draws (drop path) then depend only on the step, so a resumed run matches exactly."""
        state = ckpt.rng_state()
        try:
            return next(it)
        finally:
            ckpt.set_rng_state(state)

    def fit(self, resume: str | Path | None = None) -> dict:
        if resume is not None:
            self.load(resume)
        elif not self.cfg.get("overwrite") and ckpt.checkpoints_in(self.output_dir):
            raise OutputDirError(refuse_reuse_message(self.output_dir))
        if self.dist.is_main:
            ckpt.remove_stale_temps(self.output_dir)
        fresh_log = resume is None  # the old log.jsonl goes only once the first step has succeeded
        stop_after = int(self.cfg.get("stop_after") or 0)
        done_here = 0
        eval_every = int(self.cfg.get("eval_every") or 0)
        save_every = int(self.cfg.get("save_every") or 0)
        save_epochs = int(self.cfg.get("save_every_epochs") or 1)
        t_start = time.perf_counter()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            in_epoch = self.step % self.steps_per_epoch
            if in_epoch == 0:
                self.loader.set_epoch(epoch)
            it = iter(self.loader)
            while in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                t_step = time.perf_counter()  # data + compute of this step: the logged images_per_s
                batches = [self._next_batch(it) for _ in range(self.accum)]
                t_data = time.perf_counter()
                metrics = self.train_step(batches, epoch)  # ends with a host sync (the finite check)
                t_done = time.perf_counter()
                if fresh_log:
                    self.logger.reset()
                    self._drop_old_best()
                    fresh_log = False
                images = metrics.pop("_images")
                self.history.append(metrics["loss"])
                self.step += 1
                in_epoch += 1
                done_here += 1
                metrics["data_s"], metrics["compute_s"] = t_data - t_step, t_done - t_data
                shared = all_reduce_mean(metrics, self.device)
                timing = self._timing(t_step, done_here)
                rate = images / max(time.perf_counter() - t_step, 1e-9)
                self.logger.log({"step": self.step, "epoch": epoch, **shared, **timing, "images_per_s": rate},
                                self.step)
                self.logger.progress(self.step, self.total_steps, epoch, {**shared, **timing}, images)
                if self._stop_agreed:
                    self.save()
                    return self._summary(t_start, stopped=True, preempted=self._stop_reason or "peer rank")
                if save_every and self.step % save_every == 0:
                    self.save()
                if stop_after and done_here >= stop_after:
                    self.save()
                    return self._summary(t_start, stopped=True)
            del it
            evaluate = self.eval_fn is not None and eval_every and (epoch + 1) % eval_every == 0
            # every --save-every-epochs epochs, at the end, and before an evaluation that may keep the best
            if self.saved_step != self.step and (self.step >= self.total_steps or (epoch + 1) % save_epochs == 0
                                                 or (evaluate and self.cfg.get("best_metric"))):
                self.save()
            if evaluate and self.dist.is_main:
                result = self.evaluate()
                self.logger.log({"step": self.step, "epoch": epoch, **result}, self.step)
                print("eval " + "  ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
                self._keep_best(result, epoch)
                if self.ema is not None:
                    self._keep_best(result, epoch, suffix="_ema")
        return self._summary(t_start, stopped=False)

    def evaluate(self) -> dict:
        """``eval_fn`` on the trained model and, with ``--model-ema``, on its EMA (the same keys + ``_ema``).
        An ``eval_fn`` with an ``evaluate_model(module)`` method gets the whole module (fine-tuning's
        classifier); any other gets ``module.encoder()``."""
        def run(module):
            fn = getattr(self.eval_fn, "evaluate_model", None)
            return dict(fn(module) if fn is not None else self.eval_fn(module.encoder()))

        result = run(self.method)
        if self.ema is not None:
            result.update({f"{k}_ema": v for k, v in run(self.ema.module).items()})
        self.last_eval = (self.step, result)
        return result

    BEST = "checkpoint-best.pt"

    def _drop_old_best(self) -> None:
        """A fresh run (``--overwrite``) drops the old run's best records once its first step succeeded."""
        if not self.dist.is_main:
            return
        for suffix in ("", "_ema"):
            for p in (self.output_dir / f"best{suffix}.json", self.output_dir / self.BEST.replace(".pt", f"{suffix}.pt")):
                p.unlink(missing_ok=True)

    def _keep_best(self, result: dict, epoch: int, suffix: str = "") -> None:
        """With ``cfg["best_metric"]`` (higher is better): when an evaluation beats the best so far, the
        epoch's checkpoint (saved just before the evaluation, so it holds exactly the evaluated weights) is
        copied atomically to ``checkpoint-best.pt`` and ``best.json`` records the value (read back on resume).
        ``suffix="_ema"``: the same for the EMA's value (``checkpoint-best_ema.pt``, ``best_ema.json``)."""
        key = self.cfg.get("best_metric")
        if not key or key + suffix not in result:
            return
        key += suffix
        assert self.saved_step == self.step, "the evaluated weights must be those of checkpoint-last.pt"
        record = self.output_dir / f"best{suffix}.json"
        target = self.output_dir / (self.BEST.replace(".pt", f"{suffix}.pt"))
        best = None
        if record.is_file():
            try:
                best = float(json.loads(record.read_text())["value"])
            except (ValueError, KeyError, TypeError):
                best = None
        value = float(result[key])
        if best is not None and not value > best:
            return
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(self.last_checkpoint, tmp)
        os.replace(tmp, target)
        tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"metric": key, "value": value, "epoch": epoch, "step": self.step}) + "\n")
        os.replace(tmp, record)
        print(f"best {key} {value:.2f} (epoch {epoch}): {target}", flush=True)

    def _timing(self, t_step: float, done_here: int) -> dict[str, float]:
        """ETA from a running mean of this run's step times (the first step, with its warm-up, weighs less
        after a few steps) and the peak accelerator memory."""
        now = time.perf_counter()
        dt = now - t_step
        self._step_time = dt if done_here <= 1 else 0.9 * self._step_time + 0.1 * dt
        out = {"step_s": dt, "eta_s": self._step_time * (self.total_steps - self.step)}
        if self.device.type == "cuda":
            out["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def _summary(self, t_start: float, stopped: bool, preempted: str | None = None) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "stopped": stopped, "preempted": preempted,
                "seconds": time.perf_counter() - t_start, "history": list(self.history)}


class OutputDirError(ValueError):
    """The output folder holds another run's checkpoint and neither --resume nor --overwrite was given."""


def refuse_reuse_message(output_dir) -> str:
    found = ", ".join(p.name for p in ckpt.checkpoints_in(output_dir)[:3])
    return (f"--output-dir {output_dir} already holds a run ({found}); continue it with --resume, start over with "
            "--overwrite (the checkpoint is replaced at the first save), or choose another --output-dir")
