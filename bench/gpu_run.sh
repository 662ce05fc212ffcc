#!/usr/bin/env bash
# One prepared GPU run (see bench/gpu.py): bash bench/gpu_run.sh OUT [--budget SECONDS] [--dry-run] [--only STEPS]
# On the device tool: bash bench/gpu_run.sh "$OUT"   (writes gpu_run.log, steps.json, <gpu>.json/.md, plots.tar)
set -u
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_run.sh OUT [--budget SECONDS] [--dry-run] [--only STEPS] [--build-cuda]" >&2
    exit 2
fi
exec "${PYTHON:-python}" -m bench.gpu "$@"
