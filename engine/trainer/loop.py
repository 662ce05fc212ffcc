"""The generic training loop.

One optimizer step = ``accum_steps`` micro-batches. Before each step the precomputed schedules (lr, weight
decay, method schedules such as EMA momentum) are read at index ``step`` and written into the optimizer's
param groups and the method. A step is::

    forward under autocast -> loss / accum -> (scaled) backward          x accum_steps (DDP no_sync between)
    all-ranks finite-loss check -> method.after_backward -> unscale + clip -> optimizer step -> method.after_step

A non-finite loss raises :class:`NonFiniteLossError` before the optimizer step, so parameters and the last
checkpoint on disk stay good. Checkpoints (rank 0, atomic) hold everything needed to continue the exact same
run: model, optimizer, grad scaler, step (= schedule position), RNG states and the data loader position.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from engine.trainer import checkpoint as ckpt
from engine.trainer.config import peak_lr
from engine.trainer.distributed import DistInfo, all_reduce_, all_reduce_mean
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
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.method, device_ids=ids,
                             find_unused_parameters=bool(getattr(method, "ddp_find_unused_parameters", False)))
        else:
            self.model = self.method
        self.optimizer = build_optimizer(self.method, cfg.get("optimizer", "adamw"),
                                         (cfg.get("beta1", 0.9), cfg.get("beta2", 0.999)))
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

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / ckpt.LAST

    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "total_steps": self.total_steps,
            "rng": ckpt.rng_state(),
            "loader": self.loader.state_dict(),
            "config": dict(self.cfg),
            "method": self.cfg.get("method"),
            "encoder_config": dict(getattr(self.method.encoder(), "config", {})),
            "history": list(self.history),
        }

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return ckpt.save_atomic(self.state_dict(), self.last_checkpoint)

    def load(self, path: str | Path) -> None:
        state = ckpt.load(path, map_location="cpu")
        if state.get("total_steps") != self.total_steps:
            raise ValueError(f"--resume {path}: checkpoint plans {state.get('total_steps')} steps, this run "
                             f"{self.total_steps}; resume with the same --epochs/--max-steps/--batch-size")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])

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
        bad = torch.tensor([0.0 if torch.isfinite(metrics_sum["loss"]) else 1.0], device=self.device)
        all_reduce_(bad)
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"non-finite loss ({metrics_sum['loss'].item()}) at step {self.step} (epoch {epoch}); stopping "
                f"before the optimizer step. Last good checkpoint: "
                f"{self.last_checkpoint if self.last_checkpoint.exists() else 'none yet'} (intact). "
                "Try a lower --lr/--blr, --clip-grad, or --precision bf16/fp32.")
        self.method.after_backward()
        clip = float(self.cfg.get("clip_grad") or 0.0)
        grad_norm = None
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step()
        metrics = {k: float(v) for k, v in metrics_sum.items()}
        metrics["lr"], metrics["wd"] = values["lr"], values["wd"]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["_images"] = images * self.dist.world_size
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
        else:
            self.logger.reset()  # a fresh run starts a fresh log.jsonl
        stop_after = int(self.cfg.get("stop_after") or 0)
        done_here = 0
        eval_every = int(self.cfg.get("eval_every") or 0)
        save_every = int(self.cfg.get("save_every") or 0)
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
                metrics = self.train_step(batches, epoch)
                images = metrics.pop("_images")
                self.history.append(metrics["loss"])
                self.step += 1
                in_epoch += 1
                done_here += 1
                shared = all_reduce_mean(metrics, self.device)
                rate = images / max(time.perf_counter() - t_step, 1e-9)
                self.logger.log({"step": self.step, "epoch": epoch, **shared, "images_per_s": rate}, self.step)
                self.logger.progress(self.step, self.total_steps, epoch, shared, images)
                if save_every and self.step % save_every == 0:
                    self.save()
                if stop_after and done_here >= stop_after:
                    self.save()
                    return self._summary(t_start, stopped=True)
            del it
            self.save()
            if self.eval_fn is not None and eval_every and (epoch + 1) % eval_every == 0 and self.dist.is_main:
                result = self.eval_fn(self.method.encoder())
                self.logger.log({"step": self.step, "epoch": epoch, **result}, self.step)
                print("eval " + "  ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
        return self._summary(t_start, stopped=False)

    def _summary(self, t_start: float, stopped: bool) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "stopped": stopped,
                "seconds": time.perf_counter() - t_start, "history": list(self.history)}
