#!/usr/bin/env bash
# Make (or refresh) .venv with the pinned dev stack and this package installed in editable mode.
# Source it (`. scripts/setup_env.sh`) to get the venv on PATH; the other scripts do.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_root"
_py="${PYTHON:-}"
if [ -z "$_py" ]; then
  for c in python3.11 python3.12 python3.10 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1; then _py="$c"; break; fi
  done
fi
[ -n "$_py" ] || { echo "setup_env: no python3 (3.10+) found on PATH" >&2; exit 1; }
"$_py" -c 'import sys; assert sys.version_info >= (3,10), "Python 3.10+ is needed"'
if [ ! -x .venv/bin/python ]; then
  echo "setup_env: creating .venv with $($_py --version)"
  "$_py" -m venv .venv
fi
_stamp=.venv/.rtl_installed
_want="$(cat settings.ini setup.py | sha1sum | cut -c1-40)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
  echo "setup_env: installing torch, torchvision, the dev stack and rtl_fastai (a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
  # torch/torchvision first: where a pip constraint file caps them (as on our CI), pip takes them from local disk.
  .venv/bin/python -m pip install -q --disable-pip-version-check 'torch>=2.5' 'torchvision>=0.20' 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import rtl_fastai, fastai, nbdev" || { echo "setup_env: install failed" >&2; exit 1; }
  echo "$_want" > "$_stamp"
fi
export PATH="$_root/.venv/bin:$PATH"
export VIRTUAL_ENV="$_root/.venv"
