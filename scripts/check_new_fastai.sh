#!/usr/bin/env bash
# The exported library must also run with the newest fastai (2.8.12, fastcore 2.x), which the pinned dev
# stack (nbdev 2.4.14 needs fastcore<2) cannot hold. This makes a second venv, .venv-newfastai/, that
# reuses the torch/torchvision of .venv/ through a .pth file (appended after its own site-packages, so
# its newer fastai and fastcore win), installs the newest fastai there, and imports every module.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
FASTAI_NEW="${FASTAI_NEW:-fastai==2.8.12}"
base_site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
py="$(python -c 'import sys; print(sys.executable)')"
if [ ! -x .venv-newfastai/bin/python ]; then "$py" -m venv .venv-newfastai; fi
new_site="$(.venv-newfastai/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_site" > "$new_site/zz_rtl_base_venv.pth"
.venv-newfastai/bin/python -m pip install -q --disable-pip-version-check "$FASTAI_NEW" 'fastcore>=2' 2>&1 \
  | grep -v -e "is ignored: it is neither" -e "outside environment" || true
PYTHONPATH="$PWD" .venv-newfastai/bin/python - <<'PY'
import importlib, pkgutil, fastai, fastcore, torch
import rtl_fastai
print(f"fastai {fastai.__version__}, fastcore {fastcore.__version__}, torch {torch.__version__}")
assert int(fastcore.__version__.split('.')[0]) >= 2, "expected fastcore 2.x in .venv-newfastai"
mods = [m.name for m in pkgutil.walk_packages(rtl_fastai.__path__, 'rtl_fastai.') if not m.name.endswith('_modidx')]
for m in mods: importlib.import_module(m)
print("imported with the newest fastai:", ", ".join(mods))
PY
if [ -f tests/newfastai_smoke.py ]; then PYTHONPATH="$PWD" .venv-newfastai/bin/python tests/newfastai_smoke.py; fi
# the tutorials, as nbdev_test runs them, under the newest fastai (execnb alone: nbdev does not import here), then
# every module notebook, whose examples are tests (about 8 minutes on 2 cores; the whole pytest suite passed there
# too, 2026-11-30, but takes 26 minutes: run it by hand with `.venv-newfastai/bin/python -m pytest tests/`)
PYTHONPATH="$PWD" MPLBACKEND=Agg .venv-newfastai/bin/python scripts/run_notebooks.py nbs/tutorials/quick_start.ipynb \
  nbs/tutorials/own_folder.ipynb nbs/tutorials/own_robust_model.ipynb
PYTHONPATH="$PWD" MPLBACKEND=Agg .venv-newfastai/bin/python scripts/run_notebooks.py nbs/[0-9]*.ipynb
