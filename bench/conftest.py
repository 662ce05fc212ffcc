"""pytest-benchmark harness shared by every bench file.

Use the ``bench`` fixture instead of ``benchmark`` directly::

    def test_scatter(bench):
        bench(fn, x, mask, kernel="masked_token_scatter", provider="ours", shape="B256 N196 D768",
              dtype=x.dtype, reference=lambda: ref(x, mask), bytes_moved=..., flops=...)

Timing (``bench/timing.py``): on CUDA every case gets its device time (``kernel_s``: CUDA events over many
calls after warm-up, L2 flushed before each call, as ``triton.testing.do_bench``; the row's primary time),
for launch-bound calls (or ``graphs="always"``) a CUDA-graph time (``graph_s``; ``BENCH_CUDA_GRAPHS=0`` turns
graphs off), and its end-to-end call time (``call_s``: sync, call, sync, pytest-benchmark's median). On CPU the primary time is the wall-clock median. ``reference`` is timed
the same way. ``extra_info`` also records device, versions, shape, dtype, bytes/FLOPs and achieved rates.

Results: a plain ``pytest bench/ --benchmark-only`` writes nothing into the repository. ``--save-results``
merges the run into ``bench/results/<device>.json`` and re-renders ``bench/results/<device>.md`` (+ plots);
``--results-dir DIR`` writes the same two files into DIR instead (no plots unless ``--results-plots``),
rewritten after every case so that an interrupted run keeps what it measured. Our own JSON does not go
through pytest-benchmark's ``--benchmark-json`` (whose option type changed from an open file to a path in
5.3), so every pytest-benchmark from 4.0 on works, and ``--benchmark-json PATH`` still works as documented.

``BENCH_DRY_RUN=1`` (``python -m bench.gpu --dry-run``): the CUDA-marked cases run on the CPU with tiny
shapes and the Triton interpreter, so the GPU plan is exercised in CI. Benches marked ``@pytest.mark.cuda``
are otherwise skipped on a CPU-only machine.
"""

import datetime
import os
import pathlib
import platform

import pytest
import torch

from bench import timing

# the root conftest.py's --device rule sets TRITON_INTERPRET (on exactly when the device is the CPU, as under
# the dry run) before anything imports triton
DRY_RUN = os.environ.get("BENCH_DRY_RUN", "") not in ("", "0")

# ``torch.compile`` providers compile for tens of seconds each on a GPU: ``-m "not compile"`` skips them all
COMPILE = pytest.param("compile", marks=pytest.mark.compile, id="compile")
# the device of the CUDA cases: the CPU under --dry-run (tiny shapes, Triton interpreter)
GPU = torch.device("cpu") if DRY_RUN else torch.device("cuda")


def sized(real, tiny):
    """``real`` on a GPU, ``tiny`` under the dry run of the GPU plan."""
    return tiny if DRY_RUN else real


def pytest_addoption(parser):
    group = parser.getgroup("bench results")
    group.addoption("--save-results", action="store_true", default=False,
                    help="merge this run into bench/results/<device>.json and re-render bench/results/<device>.md")
    group.addoption("--results-dir", default=None, metavar="DIR",
                    help="write <device>.json and <device>.md into DIR (after every case) instead")
    group.addoption("--results-plots", action="store_true", default=False,
                    help="with --results-dir: also render the PNG plots (a folder of files) at the end")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "compile: a torch.compile provider (slow to build; deselect with -m 'not compile')")
    config.addinivalue_line("markers", "headline: a headline case of the GPU plan (python -m bench.gpu)")
    config._bench_records = []
    config._bench_started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def pytest_collection_modifyitems(config, items):
    if DRY_RUN or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CPU-only machine: CUDA benches skipped")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _results_target(config):
    """(directory, plots?) where this run's rows go, or None when results are not saved."""
    out_dir = config.getoption("--results-dir", default=None)
    if out_dir:
        return pathlib.Path(out_dir), bool(config.getoption("--results-plots", default=False))
    if config.getoption("--save-results", default=False):
        from bench import report

        return report.RESULTS, True
    return None


def _write_results(config, plots: bool):
    target = _results_target(config)
    records = getattr(config, "_bench_records", [])
    if target is None or not records:
        return
    from bench import report

    out_dir, want_plots = target
    data = {"datetime": config._bench_started, "machine_info": {"node": platform.node()},
            "benchmarks": list(records)}
    groups, meta = report.rows_from_json(data)
    slug = report.device_slug(meta)
    merged = report.merge_into(out_dir / f"{slug}.json", data)
    groups, meta = report.rows_from_json(merged)
    report.write_report(groups, meta, out_dir / f"{slug}.md", plots=plots and want_plots)


def pytest_sessionfinish(session, exitstatus):
    _write_results(session.config, plots=True)


def _versions():
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    dry = " dry-run" if DRY_RUN else ""
    return f"cpu {platform.machine()} {os.cpu_count()} cores{dry} (torch threads={torch.get_num_threads()})"


@pytest.fixture(scope="session")
def bench_device():
    if DRY_RUN:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synced(fn, device):
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        torch.cuda.synchronize(device)
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return run


def median_time(fn, device, repeats=10, warmup=2) -> float:
    """Primary time in seconds of ``fn()``: the device time (events, L2 flush) on CUDA, the wall median on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return timing.kernel_time(fn, device).median_s
    if DRY_RUN:
        repeats, warmup = 1, 0
    return timing.wall_time(fn, device, repeats=repeats, warmup=warmup)


def peak_memory(fn, device, above_baseline: bool = True) -> int | None:
    """CUDA allocator peak of one ``fn()`` in bytes: above what was allocated before the call (a kernel's
    temporaries and outputs), or the absolute peak (a whole training step). None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if above_baseline else 0
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


_CEILINGS: dict[str, dict] = {}


def device_ceilings(device: torch.device) -> dict:
    """Measured once per run and device: copy bandwidth (GB/s, read + write) and a large GEMM (TFLOP/s;
    bf16 on CUDA, fp32 on CPU), timed like the cases. Every kernel's achieved rate is reported as a fraction of
    these (masked cross-entropy is also compared with its own GEMMs at its shapes: the ``three-gemms`` peer)."""
    key = str(device)
    if key in _CEILINGS:
        return _CEILINGS[key]
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (1 << 22 if DRY_RUN else 1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = median_time(lambda: dst.copy_(src), device, repeats=5)
    n = 8192 if cuda else (256 if DRY_RUN else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm_s = median_time(lambda: a @ b, device, repeats=3)
    _CEILINGS[key] = {
        "copy_GBps": 2 * n_bytes / copy_s / 1e9,
        "gemm_TFLOPs": 2 * n**3 / gemm_s / 1e12,
        "gemm_dtype": str(dtype).replace("torch.", ""),
    }
    return _CEILINGS[key]


def _record(request, benchmark, info: dict, primary: float, call_stats):
    config = request.config
    stats = {"median": primary}
    if call_stats is not None:
        stats.update(call_median=call_stats.median, min=call_stats.min, max=call_stats.max,
                     rounds=call_stats.rounds)
    config._bench_records.append({"name": request.node.name, "fullname": request.node.nodeid,
                                  "group": benchmark.group, "stats": stats, "extra_info": info})  # later additions show too
    _write_results(config, plots=False)  # after every case: an interrupted run keeps what it measured


@pytest.fixture
def bench(benchmark, bench_device, request):
    def run(fn, *args, kernel, provider, shape, dtype=None, device=None, reference=None, bytes_moved=None,
            flops=None, rounds=None, graphs=True, **extra):
        dev = torch.device(device) if device is not None else bench_device
        info = benchmark.extra_info
        info.update(
            kernel=kernel, provider=provider, shape=shape, dtype=str(dtype).replace("torch.", "") if dtype else None,
            device=device_name(dev), bytes_moved=bytes_moved, flops=flops, **_versions(), **extra,
        )
        benchmark.group = f"{kernel} {shape}"
        cuda = dev.type == "cuda"
        if reference is not None:
            info["reference_median_s"] = median_time(reference, dev)
        timed = _synced(fn, dev)
        if DRY_RUN:
            result = benchmark.pedantic(timed, args=args, rounds=1, warmup_rounds=0)
        elif rounds:
            result = benchmark.pedantic(timed, args=args, rounds=rounds, warmup_rounds=1)
        else:
            result = benchmark(timed, *args)
        call = benchmark.stats.stats if benchmark.stats is not None else None
        if call is None:  # --benchmark-disable: nothing measured
            return result
        info["call_s"] = call.median
        call_fn = (lambda: fn(*args)) if args else fn
        if cuda and call.median > 0.05:  # a long call (a training step): launch cost and L2 are noise, the wall
            med = call.median            # time of a synchronous call is its device time
            info.update(kernel_s=call.median, timing="wall (call > 50 ms, device-bound)")
        elif cuda or DRY_RUN:
            t = timing.kernel_time(call_fn, dev, quick=DRY_RUN)
            info.update(kernel_s=t.median_s, kernel_p20_s=t.p20_s, kernel_p80_s=t.p80_s, kernel_reps=t.reps,
                        timing=t.method)
            med = t.median_s if cuda else call.median
            if cuda and graphs and os.environ.get("BENCH_CUDA_GRAPHS", "1") != "0" and (
                    graphs == "always" or timing.launch_bound(t.median_s, call.median)):
                try:
                    g = timing.graph_time(call_fn, dev)
                    info.update(graph_s=g.median_s, graph_calls=g.reps)
                except Exception as exc:  # noqa: BLE001 - not capturable (host sync, CPU op): say why
                    info["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
                    try:
                        torch.cuda.synchronize(dev)
                    except Exception:  # noqa: BLE001
                        pass
        else:
            med = call.median
            info["timing"] = "wall"
        info["median_s"] = med
        if reference is not None and med > 0:
            info["speedup_vs_reference"] = info["reference_median_s"] / med
        if bytes_moved or flops:
            ceil = device_ceilings(dev)
            info["ceiling_copy_GBps"] = ceil["copy_GBps"]
            info["ceiling_gemm_TFLOPs"] = ceil["gemm_TFLOPs"]
        if bytes_moved:
            info["achieved_GBps"] = bytes_moved / med / 1e9
            info["fraction_of_bandwidth"] = info["achieved_GBps"] / ceil["copy_GBps"]
        if flops:
            info["achieved_TFLOPs"] = flops / med / 1e12
            info["fraction_of_gemm_peak"] = info["achieved_TFLOPs"] / ceil["gemm_TFLOPs"]
        _record(request, benchmark, info, med, call)
        return result

    return run
