#!/usr/bin/env bash
# The GPU plan (python -m bench.gpu) run on this CPU machine with --dry-run: the same steps, tiny shapes, the
# Triton interpreter (a few minutes on 2 cores). Fails when a step fails, when the plan's files are missing, or
# when the run touched the git tree, so the prepared GPU run cannot rot between GPU windows.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
before="$(git status --porcelain --untracked-files=all -- bench)"
python -m bench.gpu "$out" --dry-run --budget 1800  # ~5 min on 2 idle cores; the caps x4 in a dry run
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = json.loads((out / "steps.json").read_text())["steps"]
bad = [s["name"] for s in steps if not s["status"].startswith("ok")]
assert not bad, f"GPU plan dry run: steps not ok: {bad}"
assert [s["name"] for s in steps] == ["env", "build", "precompile", "tests", "bench", "bench-train", "tests-ops",
                                          "bench-rest", "bench-compile"]
files = sorted(p.name for p in out.iterdir())
assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device tool returns
rows = [p for p in out.glob("*.json") if p.name != "steps.json"]
assert len(rows) == 1 and json.loads(rows[0].read_text())["benchmarks"], files
print("GPU plan dry run: ok;", ", ".join(files))
PY
after="$(git status --porcelain --untracked-files=all -- bench)"
[ "$before" = "$after" ] || { echo "GPU plan dry run changed the git tree" >&2; exit 1; }
