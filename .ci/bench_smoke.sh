#!/usr/bin/env bash
# Bench smoke on the fresh install (called from .ci/run after the tests): a few CPU cases of every bench file,
# about a minute on 2 cores, so that `pytest bench/ --benchmark-only` cannot silently rot. Checks that
#   * the bench command runs with the installed pytest-benchmark (any version from 4.0 on), --benchmark-json included;
#   * every bench file produced rows, our results JSON/markdown render (--results-dir), the report CLI reads
#     pytest-benchmark's own JSON;
#   * a bench run leaves the git tree as it found it (results are written into bench/results only with --save-results).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)"
before="$(git status --porcelain --untracked-files=all -- bench)"
cases=(
    "bench/test_bench_masks.py::test_mask_generator[native-native-1-spark_masks]"
    "bench/test_bench_masks.py::test_mask_generator[reference-reference-1-spark_masks]"
    "bench/test_bench_attention.py::test_attention_cpu[reference-fwd]"
    "bench/test_bench_attention.py::test_attention_cpu[sdpa-math-fwd+bwd]"
    "bench/test_bench_nearest_code.py::test_bench_nearest_code[ours-cpu-fp32]"
    "bench/test_bench_ema_codebook_update.py::test_bench_ema_update[ours-cpu]"
    "bench/test_bench_data.py::test_bench_rrc_flip_normalise[torch]"
    "bench/test_bench_dino_loss.py::test_bench_dino_loss[cpu-small-ours-fwd+bwd]"
    "bench/test_bench_masked_token_scatter.py::test_bench_masked_token_scatter[fwd+bwd-ours-cpu-small-fp32]"
    "bench/test_bench_gather_masked.py::test_bench_gather_masked[fwd+bwd-ours-cpu-small-fp32]"
    "bench/test_bench_masked_cross_entropy.py::test_bench_masked_cross_entropy[fwd+bwd-ours-cpu-small-fp32]"
    "bench/test_bench_masked_cross_entropy.py::test_bench_masked_cross_entropy[fwd+bwd-three-gemms-cpu-small-fp32]"
    "bench/test_bench_sparse_conv2d.py::test_sparse_conv_cpu[ours-rn50_l1_3x3-fwd]"
    "bench/test_bench_masked_batch_norm.py::test_masked_batch_norm_cpu[ours-fwd+bwd]"
    "bench/test_bench_train_step.py::test_train_step_cpu[simmim-ours]"
    "bench/test_bench_window_attention.py::test_window_attention_cpu[reference-fwd+bwd]"
    "bench/test_bench_dispatch.py::test_dispatch_cpu[masked_token_scatter-eager]"
)
BENCH_DATA_IMAGES=64 python -m pytest -p no:cacheprovider "${cases[@]}" --benchmark-only -q \
    --benchmark-max-time=0.05 --benchmark-min-rounds=1 \
    --benchmark-json "$tmp/pytest-benchmark.json" --results-dir "$tmp/results"
python - "$tmp" "${#cases[@]}" <<'PY'
import json, pathlib, sys
tmp, n_cases = pathlib.Path(sys.argv[1]), int(sys.argv[2])
pb = json.loads((tmp / "pytest-benchmark.json").read_text())["benchmarks"]
(ours,) = [p for p in (tmp / "results").glob("*.json")]
rows = json.loads(ours.read_text())["benchmarks"]
files = {r["fullname"].split("::")[0] for r in rows}
want = {str(p) for p in pathlib.Path("bench").glob("test_bench_*.py")}
assert files == want, f"bench files without a row (add a case of each new bench file above): {sorted(want - files)}"
assert len(pb) == len(rows) == n_cases, (len(pb), len(rows), n_cases)
md = ours.with_suffix(".md").read_text()
assert "## Targets of the kernel issues" in md and "| spark_masks |" in md
print(f"bench smoke: {len(rows)} rows from {len(files)} bench files; {ours.name} and its report written")
PY
python -m bench.report "$tmp/pytest-benchmark.json" --out "$tmp/from-pytest-benchmark.md" --no-plots
after="$(git status --porcelain --untracked-files=all -- bench)"
if [ "$before" != "$after" ]; then
    echo "bench smoke: the bench run changed the git tree under bench/:" >&2
    diff <(echo "$before") <(echo "$after") >&2 || true
    exit 1
fi
echo "bench smoke: ok"
