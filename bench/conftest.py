"""pytest-benchmark harness shared by every bench file.

Use the ``bench`` fixture instead of ``benchmark`` directly::

    def test_scatter(bench):
        bench(fn, x, mask, kernel="masked_token_scatter", provider="ours", shape="B256 N196 D768",
              dtype=x.dtype, reference=lambda: ref(x, mask), bytes_moved=..., flops=...)

It synchronises CUDA around every timed call, records device, versions, shapes and dtype in
``extra_info`` and, when ``reference`` is given, the reference's own median time and the ratio.
Benches marked ``@pytest.mark.cuda`` are skipped on a CPU-only machine. ``python -m bench.report``
turns the ``--benchmark-json`` output into a markdown table under ``bench/results/``.
"""

import os
import platform
import statistics
import sys
import time

if "cuda" not in " ".join(sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Always keep a JSON of the run (pytest-benchmark only writes one when asked), so results tables update."""
    if getattr(config.option, "benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        path = os.path.join(os.path.dirname(__file__), "results", ".last-run.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        config.option.benchmark_json = open(path, "wb")  # noqa: SIM115 - closed by pytest-benchmark


# ``torch.compile`` providers compile for tens of seconds each on a GPU: ``-m "not compile"`` skips them all
COMPILE = pytest.param("compile", marks=pytest.mark.compile, id="compile")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "compile: a torch.compile provider (slow to build; deselect with -m 'not compile')")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Merge this run into bench/results/<device>.json and re-render bench/results/<device>.md."""
    from bench import report

    groups, meta = report.rows_from_json(output_json)
    if not groups:
        return
    slug = report.device_slug(meta)
    merged = report.merge_into(report.RESULTS / f"{slug}.json", output_json)
    groups, meta = report.rows_from_json(merged)
    report.write_report(groups, meta, report.RESULTS / f"{slug}.md")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="CPU-only machine: CUDA benches skipped")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


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
    return f"cpu {platform.machine()} {os.cpu_count()} cores (torch threads={torch.get_num_threads()})"


@pytest.fixture(scope="session")
def bench_device():
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
    """Median wall time in seconds of ``fn()`` (synchronised on CUDA)."""
    run = _synced(fn, device)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    bf16 on CUDA, fp32 on CPU). Every kernel's achieved rate is reported as a fraction of these."""
    key = str(device)
    if key in _CEILINGS:
        return _CEILINGS[key]
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = median_time(lambda: dst.copy_(src), device, repeats=10 if cuda else 5)
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm_s = median_time(lambda: a @ b, device, repeats=10 if cuda else 3)
    _CEILINGS[key] = {
        "copy_GBps": 2 * n_bytes / copy_s / 1e9,
        "gemm_TFLOPs": 2 * n**3 / gemm_s / 1e12,
        "gemm_dtype": str(dtype).replace("torch.", ""),
    }
    return _CEILINGS[key]


@pytest.fixture
def bench(benchmark, bench_device):
    def run(fn, *args, kernel, provider, shape, dtype=None, device=None, reference=None, bytes_moved=None,
            flops=None, rounds=None, **extra):
        dev = torch.device(device) if device is not None else bench_device
        info = benchmark.extra_info
        info.update(
            kernel=kernel, provider=provider, shape=shape, dtype=str(dtype).replace("torch.", "") if dtype else None,
            device=device_name(dev), bytes_moved=bytes_moved, flops=flops, **_versions(), **extra,
        )
        benchmark.group = f"{kernel} {shape}"
        if reference is not None:
            info["reference_median_s"] = median_time(reference, dev)
        timed = _synced(fn, dev)
        if rounds:
            result = benchmark.pedantic(timed, args=args, rounds=rounds, warmup_rounds=1)
        else:
            result = benchmark(timed, *args)
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        if stats is not None:
            med = stats.median
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
        return result

    return run
