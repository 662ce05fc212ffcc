"""Timing of one bench case: what the kernel costs on the device, and what a call costs end to end.

Three numbers per case (``bench/conftest.py`` records all of them in ``extra_info``):

* ``kernel_s``  -- the device time of one call, measured as ``triton.testing.do_bench`` does: warm-up calls
  first, then many calls, each preceded by a flush of the L2 cache (zeroing a 256 MiB buffer) and bracketed by
  CUDA events; the median over the calls. The flush kernel runs ahead of each call, so the host has time to
  enqueue the call's launches and the events see the GPU work, not Python dispatch. This is the primary time
  of every CUDA row (the report's ``ours``/peer columns and the targets use it).
* ``graph_s``  -- for launch-bound calls (short, or whose end-to-end time is well above ``kernel_s``): the
  call captured ``n`` times in one CUDA graph with an L2 flush before each, replayed, minus a graph of the
  flushes alone, per call (``triton.testing.do_bench_cudagraph``, plus the flush). No host launch cost at all;
  where capture fails (a host sync, a CPU-side op) the reason is recorded instead.
* ``call_s``  -- the end-to-end time of one synchronous call (sync, call, sync; pytest-benchmark's median): what
  a Python caller waits for, dispatch and launch latency included.

On CPU the same procedure runs with wall-clock "events" (``time.perf_counter``) and no graphs: this is what
``--dry-run`` of the GPU plan exercises, so the GPU timing code path is run in CI.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

FLUSH_BYTES = 256 << 20  # as triton.runtime.driver's get_empty_cache_for_benchmark (H100/H200 L2: 50/60 MiB)


@dataclasses.dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int
    method: str


class _WallEvent:
    """A stand-in for ``torch.cuda.Event`` on CPU (wall clock)."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end) -> float:  # milliseconds, like torch.cuda.Event
        return (end.t - self.t) * 1e3


_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        n = FLUSH_BYTES if device.type == "cuda" else (8 << 20)
        _FLUSH[key] = torch.empty(n // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def _api(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.Event, lambda: torch.cuda.synchronize(device)
    return _WallEvent, lambda: None


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def kernel_time(fn, device, warmup_ms: float = 25.0, rep_ms: float = 100.0, flush: bool = True,
                min_reps: int = 3, max_reps: int = 1000, quick: bool = False) -> Timing:
    """Median device time of ``fn()`` in seconds: warm-up, then per-call events with an L2 flush before each.
    ``quick``: one flushed, timed call and nothing else (the dry run, where only the code path matters)."""
    device = torch.device(device)
    Event, sync = _api(device)
    cache = _flush_buffer(device) if flush else None
    if quick:
        start, end = Event(enable_timing=True), Event(enable_timing=True)
        if cache is not None:
            cache.zero_()
        start.record()
        fn()
        end.record()
        sync()
        t = start.elapsed_time(end) * 1e-3
        return Timing(t, t, t, 1, "cuda-events+l2-flush" if device.type == "cuda" else "wall-events")
    fn()
    sync()
    # estimate from a few calls (one if a call is long), as do_bench does
    start, end = Event(enable_timing=True), Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    sync()
    est = max(start.elapsed_time(end), 1e-4)
    n_est = 1 if est > 20 else 5
    if n_est > 1:
        start.record()
        for _ in range(n_est):
            if cache is not None:
                cache.zero_()
            fn()
        end.record()
        sync()
        est = max(start.elapsed_time(end) / n_est, 1e-4)
    n_warmup = max(1, int(warmup_ms / est)) if est < warmup_ms else 0
    n_rep = int(min(max_reps, max(min_reps, rep_ms / est)))
    for _ in range(n_warmup):
        fn()
    starts = [Event(enable_timing=True) for _ in range(n_rep)]
    ends = [Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    sync()
    times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    method = "cuda-events+l2-flush" if device.type == "cuda" else "wall-events"
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), n_rep, method)


def graph_time(fn, device, rep_ms: float = 20.0, max_calls: int = 200) -> Timing:
    """Per-call device time of ``fn`` replayed from a CUDA graph (no host launch cost), L2 flushed before
    each call (the flushes' own time subtracted). Raises where ``fn`` cannot be captured."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    cache = _flush_buffer(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on the side stream (allocator, autograd, lazy init)
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    est = kernel_time(fn, device, warmup_ms=1.0, rep_ms=5.0, min_reps=3).median_s * 1e3
    n = int(max(1, min(max_calls, rep_ms / max(est, 1e-3))))
    both, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(n):
            cache.zero_()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(n):
            cache.zero_()
    torch.cuda.synchronize(device)

    def replay(g) -> list[float]:
        g.replay()  # first replay uploads the graph
        torch.cuda.synchronize(device)
        out = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            torch.cuda.synchronize(device)
            out.append(s.elapsed_time(e) * 1e-3 / n)
        return out

    t_both, t_flush = replay(both), replay(flush_only)
    flush_med = statistics.median(t_flush)
    per_call = [max(t - flush_med, 0.0) for t in t_both]
    del both, flush_only
    return Timing(statistics.median(per_call), _quantile(per_call, 0.2), _quantile(per_call, 0.8), n,
                  "cuda-graph+l2-flush")


def wall_time(fn, device, repeats: int = 10, warmup: int = 2) -> float:
    """Median end-to-end seconds of one synchronous ``fn()`` (synchronised before and after on CUDA)."""
    device = torch.device(device)
    _, sync = _api(device)
    for _ in range(warmup):
        sync()
        fn()
        sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def launch_bound(kernel_s: float, call_s: float | None) -> bool:
    """Worth a CUDA-graph measurement: a short call, or one whose end-to-end time is well above its device time."""
    return kernel_s < 100e-6 or (call_s is not None and call_s > 1.5 * kernel_s)


def autograd_step(forward, leaves, backward: bool):
    """The callable a case times: ``forward()`` and, when ``backward``, the gradients of ``leaves`` for one fixed
    random upstream gradient (drawn on the first call, so outside every timed call but the first warm-up)."""
    grad = []

    def run():
        out = forward()
        if backward:
            if not grad:
                grad.append(torch.randn_like(out))
            torch.autograd.grad(out, leaves, grad[0])
        return out

    return run
