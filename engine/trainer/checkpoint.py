"""Checkpoints that are atomic, checksummed, verified on load and never written from non-finite state.

Writing: the state goes to ``<name>.tmp-<pid>`` in the same folder, is flushed and fsync'ed, then moved over
the target with :func:`os.replace` (atomic on POSIX): a crash at any point leaves either the previous file or
the new one, never a partial file. Temp files left by a killed writer are removed by
:func:`remove_stale_temps` (a run does it when it starts).

Checksum: a checkpoint dict carries ``_digest``, a BLAKE2b digest of its whole content (every tensor's and
array's bytes, dtype and shape, every other value's repr, keys in sorted order), computed before writing and
checked by :func:`load`. A bit-flip inside tensor data (which torch.load itself would not notice) is then
reported as a corrupted file. Files stay plain ``torch.save`` files: ``torch.load`` reads them as before.

Errors: every unreadable, truncated, empty, foreign or corrupted file raises :class:`CheckpointError`, a
``ValueError`` whose one-line message names the file and what to do.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

LAST = "checkpoint-last.pt"
DIGEST_KEY = "_digest"
_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, non-finite or of another run."""


# ------------------------------------------------------------------------------------------ content digest
def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            if k == DIGEST_KEY:
                continue
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_digest(obj) -> str:
    """BLAKE2b hex digest of ``obj``'s content (the ``_digest`` entry itself excluded)."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, obj)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ finiteness
def non_finite_tensors(tensors) -> list[str]:
    """Names of the floating tensors of a ``{name: tensor}`` mapping that hold a NaN or an Inf."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(str(name))
    return bad


def optimizer_non_finite(opt_state: dict) -> list[str]:
    bad = []
    for pid, st in opt_state.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad.append(f"state[{pid}].{k}")
    return bad


def check_finite(state: dict, path) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's model weights are not all finite."""
    model = state.get("model")
    if not isinstance(model, dict):
        return
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CheckpointError(f"{path}: the weights hold NaN/Inf values ({shown}); use an earlier checkpoint of "
                              "the run, or re-train with a lower --lr / --clip-grad")


# ------------------------------------------------------------------------------------------ save / load
def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + os.replace); a dict gets ``_digest``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict):
        obj = dict(obj)
        obj[DIGEST_KEY] = content_digest(obj)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike, map_location="cpu", verify: bool = True) -> dict:
    """Read a checkpoint; with ``verify`` check its ``_digest`` (files without one, written by other tools or
    older versions, load unchecked). Raises FileNotFoundError for a missing file, CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; a write was cut short? use "
                              "another checkpoint of the run or start a new run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated zip, random bytes, pickle errors, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}"
                              + (f": {first}" if first else "") + f"; {size} bytes): the file is truncated or "
                              "corrupted; use another checkpoint of the run") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this engine (a {type(state).__name__}, not a dict)")
    expected = state.pop(DIGEST_KEY, None)
    if verify and expected is not None and content_digest(state) != expected:
        raise CheckpointError(f"{path}: checksum mismatch, the file's content is corrupted (e.g. a bit-flip on "
                              "disk); use another checkpoint of the run")
    return state


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete ``*.tmp-<pid>`` files of :func:`save_atomic` whose writer process no longer exists."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if not m or not p.is_file() or _pid_alive(int(m["pid"])):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def checkpoints_in(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files (``checkpoint-*.pt``) of a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("checkpoint-*.pt") if p.is_file())


# ------------------------------------------------------------------------------------------ RNG state
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
