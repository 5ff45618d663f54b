#!/usr/bin/env bash
# The oldest stack settings.ini admits must pass the test suite too: this makes .venv-oldest/ (git-ignored) with
# the lowest versions of the requirements (Python 3.10 where there is one, torch 2.5.1, torchvision 0.20.1, numpy 1,
# fastai 2.7.19 with the fastcore it takes) and runs pytest tests/ there, less the docs site and the notebook lint
# (which need the dev stack's nbdev). Not part of CI: torch 2.5.1 has no CPU wheel on PyPI, so its CUDA build and
# libraries (several GB) are downloaded. Run it when a requirement's floor or version-dependent code changes:
#   bash scripts/check_oldest_stack.sh [pytest args]      # PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then for c in python3.10 python3.11 python3.12 python3; do command -v "$c" >/dev/null 2>&1 && { py=$c; break; }; done; fi
OLDEST=(torch==2.5.1 torchvision==0.20.1 'numpy<2' fastai==2.7.19 'plum-dispatch<2.10')
[ -x .venv-oldest/bin/python ] || "$py" -m venv .venv-oldest
.venv-oldest/bin/python -m pip install -q --disable-pip-version-check "${OLDEST[@]}" 'pytest>=7' timm scikit-learn \
  pandas matplotlib ipywidgets tabulate safetensors accelerate 2>&1 | grep -v "is ignored: it is neither" || true
.venv-oldest/bin/python -m pip install -q --disable-pip-version-check --no-deps torchattacks==3.5.1 robustbench==1.1.1 2>&1 \
  | grep -v "is ignored: it is neither" || true
.venv-oldest/bin/python -c "import sys, torch, torchvision, numpy, fastai, fastcore
print(f'oldest stack: Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, fastai {fastai.__version__}, fastcore {fastcore.__version__}')"
MPLBACKEND=Agg PYTHONPATH="$PWD" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv-oldest/bin/python -m pytest tests/ -q \
  -p no:cacheprovider --ignore=tests/test_docs_site.py --ignore=tests/test_notebook_lint.py "$@"
