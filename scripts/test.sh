#!/usr/bin/env bash
# README command 2 (and CI): set everything up, then run every notebook (nbdev_test) and pytest tests/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# torchattacks 3.5.1 pins an old `requests`: it is a test-only reference, installed without its deps.
python -c "import torchattacks" 2>/dev/null || python -m pip install -q --disable-pip-version-check --no-deps 'torchattacks==3.5.1' 2>&1 | grep -v "is ignored: it is neither" || true
# robustbench: its CIFAR architectures are test-only references too (tests/test_robustbench.py); its own imports
# (autoattack from git, geotorch, gdown) are not needed for them, so it is installed without its deps as well.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('robustbench') is None)" 2>/dev/null || python -m pip install -q --disable-pip-version-check --no-deps 'robustbench==1.1.1' 2>&1 | grep -v "is ignored: it is neither" || true
export MPLBACKEND=Agg
echo "== nbdev_export is in sync with the notebooks"
nbdev_export
if [ -n "$(git status --porcelain -- rtl_fastai 2>/dev/null)" ] && [ "${CI:-}" = "true" ]; then
  git status --porcelain -- rtl_fastai; echo "rtl_fastai/ is out of sync with nbs/: run nbdev_export and commit" >&2; exit 1
fi
echo "== nbdev_test (every notebook)"
# one torch thread per notebook worker: two workers x two threads on two cores stall each other badly
OMP_NUM_THREADS="${NB_THREADS:-1}" nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing
echo "== pytest tests/"
python -m pytest tests/ -q "$@"
echo "== the CUDA-only tests' code, run on the CPU (RTL_TEST_CUDA_ON_CPU=1; on a GPU they run on CUDA above)"
if python -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
  RTL_TEST_CUDA_ON_CPU=1 OMP_NUM_THREADS="${NB_THREADS:-1}" python -m pytest tests/test_cuda.py -q -p no:cacheprovider
fi
