#!/usr/bin/env bash
# CI stage "compat": the tests that need the real timm (timm needs torchvision, which has no release next to
# the CPU torch 2.13 wheel of requirements.txt), run in a separate venv with torch 2.14.1 + torchvision 0.29.1.
#
#   .ci/compat.sh                              # python -m pytest -q -m timm tests, in the venv
#   .ci/compat.sh tests/test_export.py -k vit  # extra pytest arguments; paths relative to the checkout
#
# The venv lives outside the checkout and is kept between runs: ${SSL_COMPAT_VENV:-~/.cache/ssl-engine/compat-venv}.
# It is rebuilt from scratch when its stamp (python, torch, torchvision, timm, requirements) does not match.
# The project is installed into it from a private copy of the tree ($VENV/src, synced by content so that only
# changed sources recompile): the checkout's in-place kernels/_C*.so (built against the main environment's
# torch 2.13) is never touched, and the tests, run from the checkout's tests/ folder with a working directory
# outside the checkout, import the venv's copy of kernels/engine (checked below).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SSL_COMPAT_VENV:-$HOME/.cache/ssl-engine/compat-venv}"
PYTHON="${SSL_COMPAT_PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
TIMM_VERSION="${SSL_COMPAT_TIMM:-1.0.31}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1 KERNELS_BUILD_CUDA=0

t0=$(date +%s)
say() { echo "compat: $* ($(($(date +%s) - t0)) s)"; }
pip_quiet() {  # pip without the find-links noise of this machine's wheel folders; keeps pip's exit status
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# requirements.txt without the pins this venv replaces (torch, triton) and without DALI (optional at import)
REQS="$(grep -v -E '^\s*(torch|triton|nvidia-dali[a-z0-9-]*)\s*([=<>!~ ]|$)' "$ROOT/requirements.txt" \
    | sed 's/\s#.*//;/^\s*#/d;/^\s*$/d')"
STAMP="python=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])') torch==$TORCH_VERSION"
STAMP="$STAMP torchvision==$TORCHVISION_VERSION timm==$TIMM_VERSION reqs=$(printf '%s' "$REQS" | sha1sum | cut -c1-12)"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if command -v flock >/dev/null; then flock 9; fi  # two runs sharing one cache take turns

if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.stamp" 2>/dev/null)" != "$STAMP" ]]; then
    say "creating $VENV ($STAMP)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086
    pip_quiet install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "timm==$TIMM_VERSION" \
        $(printf '%s\n' "$REQS" | tr '\n' ' ')
    printf '%s\n' "$STAMP" >"$VENV/.stamp"
    say "venv ready"
else
    say "reusing $VENV"
fi

# The private copy of the tree: files whose content changed are rewritten (fresh mtime, so they rebuild), the
# others keep theirs; files gone from the checkout are removed (build outputs are kept).
# Copied: setup.py, pyproject.toml, requirements.txt, README.md and the tracked or untracked-but-not-ignored files
# of csrc/, kernels/, engine/. Build outputs of the copy (kernels/_C*.so, build/, __pycache__) stay.
"$VENV/bin/python" - "$ROOT" "$VENV/src" <<'PY'
import shutil
import subprocess
import sys
from pathlib import Path

TOP = ("setup.py", "pyproject.toml", "requirements.txt", "README.md")
DIRS = ("csrc", "kernels", "engine")


def source_files(root: Path) -> set[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                              "--", *TOP, *DIRS], check=True, capture_output=True).stdout.decode()
        files = {f for f in out.split("\0") if f and (root / f).is_file()}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but build outputs
        files = {str(p.relative_to(root)) for d in DIRS for p in (root / d).rglob("*") if p.is_file()}
        files |= {f for f in TOP if (root / f).is_file()}
    return {f for f in files if not f.endswith((".so", ".pyc")) and "__pycache__" not in f}


def build_output(path: Path) -> bool:
    return path.name.endswith(".so") or "__pycache__" in path.parts or path.name.endswith(".egg-info")


def sync(root: Path, dest: Path) -> int:
    files = source_files(root)
    changed = 0
    for f in sorted(files):
        src, dst = root / f, dest / f
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        changed += 1
    for d in DIRS:
        for p in (dest / d).rglob("*"):
            if p.is_file() and not build_output(p) and str(p.relative_to(dest)) not in files:
                p.unlink()
    return changed


n = sync(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
print(f"compat: {n} changed file(s) copied to {sys.argv[2]}")
PY

# The copy is installed as a development tree: kernels._C is built in it (build_ext --inplace, its build/ folder
# kept, so ninja recompiles only changed sources) and a .pth file puts it on the venv's sys.path. Its package
# data (engine/configs/*.yaml) is then where the code looks for it (setup.py declares no package_data, so a
# wheel of the project lacks the presets). Nothing is built in the checkout.
so_before="$(cat "$ROOT"/kernels/_C*.so 2>/dev/null | sha1sum)"
if ! (cd "$VENV/src" && "$VENV/bin/python" setup.py build_ext --inplace) >"$VENV/build.log" 2>&1; then
    tail -n 60 "$VENV/build.log" >&2
    echo "compat: building kernels._C in $VENV/src failed (whole log: $VENV/build.log)" >&2
    exit 1
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n' "$VENV/src" >"$site/ssl-engine-compat.pth"
say "project built in $VENV/src and on the venv's path"

cd "$VENV"  # not the checkout: `python -m` puts the working directory first on sys.path
"$VENV/bin/python" - "$VENV" "$TORCH_VERSION" "$TORCHVISION_VERSION" "$TIMM_VERSION" <<'PY'
import os, sys
import kernels, kernels._C, engine, timm, torch, torchvision
venv = os.path.realpath(sys.argv[1])
for mod in (kernels, kernels._C, engine):
    if not os.path.realpath(mod.__file__).startswith(venv + os.sep):
        sys.exit(f"compat: {mod.__name__} resolves to {mod.__file__}, not to the venv's copy")
for mod, want in zip((torch, torchvision, timm), sys.argv[2:]):
    if mod.__version__.split("+")[0] != want:
        sys.exit(f"compat: the venv has {mod.__name__} {mod.__version__}, not {want}: remove {venv} to rebuild it")
print(f"compat: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"kernels from {os.path.dirname(kernels.__file__)}")
PY

# the checkout's other top-level packages (bench/, imported by some test modules) without the checkout itself
rm -rf "$VENV/checkout-path" && mkdir -p "$VENV/checkout-path"
for pkg in "$ROOT"/*/__init__.py; do
    name="$(basename "$(dirname "$pkg")")"
    [[ "$name" == kernels || "$name" == engine ]] || ln -s "$ROOT/$name" "$VENV/checkout-path/$name"
done
export PYTHONPATH="$VENV/checkout-path"

# extra arguments go to pytest; test paths among them are taken relative to the checkout (and replace tests/)
args=() paths=()
for arg in "$@"; do
    if [[ "$arg" != -* && "$arg" != /* && -e "$ROOT/${arg%%::*}" ]]; then
        paths+=("$ROOT/$arg")
    else
        args+=("$arg")
    fi
done
[[ ${#paths[@]} -gt 0 ]] || paths=("$ROOT/tests")

status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m timm "${paths[@]}" ${args[@]+"${args[@]}"} || status=$?

if [[ "$(cat "$ROOT"/kernels/_C*.so 2>/dev/null | sha1sum)" != "$so_before" ]]; then
    echo "compat: the checkout's kernels/_C*.so changed during this stage (it belongs to the main env)" >&2
    status=1
fi
say "done, pytest exit status $status"
exit "$status"
