"""Atomic checkpoints and RNG-state capture.

A checkpoint is written to ``<name>.tmp-<pid>`` in the same folder, flushed and fsync'ed, then moved over the
target with :func:`os.replace` (atomic on POSIX). A crash at any point leaves either the previous file or
the new one, never a partial file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LAST = "checkpoint-last.pt"


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def find_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Resolve ``--resume``: ``None``/"" -> none; "auto" -> output_dir's last checkpoint if any; else a path."""
    if not resume:
        return None
    if resume == "auto":
        cand = Path(output_dir) / LAST
        return cand if cand.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
