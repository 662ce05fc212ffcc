"""Generic pre-training loop: schedules, checkpoints, distributed helpers, logging, configuration."""

from engine.trainer.checkpoint import find_resume, save_atomic, seed_everything
from engine.trainer.distributed import DistInfo, init_distributed
from engine.trainer.loop import NonFiniteLossError, Trainer
from engine.trainer.schedules import cosine_schedule, scaled_lr, warmup_constant_schedule

__all__ = ["DistInfo", "NonFiniteLossError", "Trainer", "cosine_schedule", "find_resume", "init_distributed",
           "save_atomic", "scaled_lr", "seed_everything", "warmup_constant_schedule"]
