#!/usr/bin/env bash
# Prepare the GPU check (issue 15), here, before the device call: the fastai stack and torchattacks as wheels for
# the GPU machine's Python 3.12 in .gpu/wheels/, and CIFAR-10 in .gpu/ (git-ignored; about 22 MiB, carried with
# carry=['.gpu']). Then run scripts/gpu_check.sh there (DEVELOPING.md, "GPU checks").
#   bash scripts/gpu_prepare.sh            # RTL_SHARED (default ../shared) holds gpu/wheels.sh; RTL_DATA the data
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${RTL_SHARED:-../shared}
data=${RTL_DATA:-$shared/data}
mkdir -p .gpu/wheels
py=${PYTHON:-python3}; [ -x .venv/bin/python ] && py=.venv/bin/python
# wheels DEST SPEC...: binary wheels for the GPU machine's Python 3.12 (Linux x86_64 or pure Python) into DEST
wheels() { local dest=$1; shift
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" "$@"; }
if [ -d .git ] && [ -f "$shared/gpu/wheels.sh" ]; then
  bash "$shared/gpu/wheels.sh"
else
  # a git worktree (.git is a file) or no shared folder: the same download as ../shared/gpu/wheels.sh, same pins
  wheels .gpu/wheels fastai==2.8.7 'fastcore>=1.14,<2' fastprogress==1.0.3 fastdownload fasttransform==0.0.2 \
    'plum-dispatch<2.10' beartype torchattacks==3.5.1
fi
# rtl_fastai requires plum-dispatch<2.10 (2.10 breaks fastai's learn.export): one version of it in the wheels
if ls .gpu/wheels/plum_dispatch-2.1[0-9]* >/dev/null 2>&1; then
  rm -f .gpu/wheels/plum_dispatch-*
  wheels .gpu/wheels 'plum-dispatch<2.10'
fi
# fallbacks, installed there only where the machine's image lacks them: fastai imports requests and yaml at import,
# and a recent huggingface_hub (timm's) no longer brings requests along; the study's report needs tabulate; fastai's
# learner imports cloudpickle, which only joblib>=1.6 (scikit-learn's) brings
rm -rf .gpu/wheels/fallback; mkdir -p .gpu/wheels/fallback   # one version of each (gpu_check installs them together)
wheels .gpu/wheels/fallback requests urllib3 certifi charset-normalizer idna pyyaml tabulate cloudpickle
[ -f "$data/cifar10.tgz" ] || { echo "gpu_prepare: no $data/cifar10.tgz (set RTL_DATA to the folder that holds it)" >&2; exit 1; }
cp -u "$data/cifar10.tgz" .gpu/
ls -1 .gpu .gpu/wheels
du -sh .gpu
git check-ignore -q .gpu/cifar10.tgz || { echo "gpu_prepare: .gpu/ is not git-ignored (add it to .gitignore)" >&2; exit 1; }
