#!/usr/bin/env bash
# The ONE command of a GPU session (issue 15): install the carried wheels, then run, each with its own timeout inside
# a global deadline, and tee each output into a file under $OUT (8 files at most):
#   env          GPU, versions, and CIFAR-10 decoded once into the cache            -> $OUT/env.txt
#   cuda_tests   pytest tests/test_cuda.py on the GPU                               -> $OUT/test_cuda.txt
#   bench        bench/bench_gpu.py, float32                                         -> $OUT/bench_fp32.txt
#   study        scripts/gpu_study.py --budget_minutes $STUDY_MINUTES               -> $OUT/study.txt, study_results.{md,json}
#   bench_bf16   bench/bench_gpu.py --bf16 --channels_last [--compile]              -> $OUT/bench_bf16.txt
#   tests        key existing tests with RTL_TEST_DEVICE=cuda (fastai puts their data on the GPU) -> $OUT/tests_cuda.txt
# Prepare here first (`bash scripts/gpu_prepare.sh`), then call the device tool with carry ['.gpu'] (DEVELOPING.md,
# "GPU checks"). Usage: bash scripts/gpu_check.sh [PART ...] (default: all, in the order above).
# Environment: CHECK_SECONDS (global deadline, default 540), STUDY_MINUTES (default 2.5; 8 for the full study, alone),
# COMPILE=1 (add --compile to bench_bf16), OUT (default /tmp/gpu_check_out when not set by the device machine);
# for a dry run on a CPU (after scripts/gpu_prepare.sh, which puts CIFAR-10 in .gpu/, or with RTL_DATA set):
#   TINY=1 SKIP_INSTALL=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh env cuda_tests bench study
# Per-part limits (seconds): env 120, cuda_tests 130, bench 190, study STUDY_MINUTES*60+60 (210 at 2.5), bench_bf16
# 150, tests 100: 900 in all, more than the deadline on purpose: the parts run in order of importance, each cut at the
# deadline, so the last (tests, which mostly repeat cuda_tests' checks, then bench_bf16) get what the others leave;
# rerun them alone if they were cut. A part cut by its limit gets SIGINT first, so that pytest prints its summary
# (the failures so far) and a script its traceback (where it stood)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
DEADLINE=$((T0 + ${CHECK_SECONDS:-540}))
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
STUDY_MINUTES=${STUDY_MINUTES:-2.5}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(env cuda_tests bench study bench_bf16 tests)

TINY_ARGS=(); [ "${TINY:-0}" = 1 ] && TINY_ARGS=(--device cpu --tiny)   # TINY=1: a dry run of this script on a CPU
if [ "${SKIP_INSTALL:-0}" = 1 ]; then :   # SKIP_INSTALL=1: the stack is already there (a dry run here)
elif ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  install() { "$PY" -m pip install -q --no-index --no-deps "$@" 2>&1 | grep -v -i 'warning' || true; }
  install .gpu/wheels/*.whl
  # the fallback wheels (gpu_prepare.sh) only for the distributions the machine's image lacks
  missing=$("$PY" -c 'import glob, importlib.metadata as md
for w in sorted(glob.glob(".gpu/wheels/fallback/*.whl")):
    try: md.version(w.split("/")[-1].split("-")[0])
    except md.PackageNotFoundError: print(w)')
  if [ -n "$missing" ]; then echo "gpu_check: installing what the image lacks:" $missing
    install $missing; fi
else echo "gpu_check: no .gpu/wheels/*.whl (run scripts/gpu_prepare.sh here and carry ['.gpu'])"; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f .gpu/cifar10.tgz ] && export RTL_DATA=$PWD/.gpu
[ -w "${HOME:-/nonexistent}" ] || export RTL_CACHE=${RTL_CACHE:-${TMPDIR:-/tmp}/rtl_fastai_cache}   # no writable home

declare -A STATUS
# run NAME FILE TIMEOUT CMD...: at most TIMEOUT seconds and never past the deadline; skipped under 20 s left
run() {
  local name=$1 file=$2 limit=$3; shift 3
  local left=$((DEADLINE - $(date +%s) - 5))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then STATUS[$name]="skipped (deadline)"; echo "== $name: skipped, ${left}s left"; return; fi
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee "$OUT/$file"
  local t=$(date +%s)
  timeout -s INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$file"
  local rc=${PIPESTATUS[0]}
  STATUS[$name]="rc=$rc in $(( $(date +%s) - t ))s$( ((rc == 124 || rc == 137 || rc == 130)) && echo ' (TIMED OUT)')"
  echo "== $name: ${STATUS[$name]}" | tee -a "$OUT/$file"
}

for p in "${parts[@]}"; do
  case $p in
    env) run env env.txt 120 bash -c "nvidia-smi; nproc --all; echo C compiler for inductor/triton: \$(command -v gcc cc | head -1); $PY -c 'import torch, fastai, fastcore, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"fastai\", fastai.__version__, \"fastcore\", fastcore.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"NO CUDA\")'; $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|fastai|fastcore|fasttransform|fastprogress|torchattacks|plum|timm|numpy) '; time $PY -c 'from rtl_fastai.data.all import load_dataset; print(load_dataset(\"cifar10\"))'" ;;
    cuda_tests) run cuda_tests test_cuda.txt 130 env RTL_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEsx -p no:cacheprovider tests/test_cuda.py --durations=10 ;;
    bench) run bench bench_fp32.txt 190 "$PY" bench/bench_gpu.py --eval_epochs 1 --reps 1 "${TINY_ARGS[@]}" ;;
    study) run study study.txt $(awk "BEGIN{print int($STUDY_MINUTES*60 + 60)}") "$PY" scripts/gpu_study.py --budget_minutes "$STUDY_MINUTES" --bf16 --channels_last --out "$OUT/study" "${TINY_ARGS[@]}" ;;
    tests) run tests tests_cuda.txt 100 env RTL_TEST_DEVICE=cuda "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_mixed_precision.py tests/test_adv_valid.py tests/test_adv_train.py tests/test_transfer.py tests/test_distill.py --durations=10 ;;
    bench_bf16) run bench_bf16 bench_bf16.txt 150 "$PY" bench/bench_gpu.py --bf16 --channels_last --eval_epochs 1 --reps 1 --parts pgd,adv,throughput "${TINY_ARGS[@]}" $( [ "${COMPILE:-0}" = 1 ] && echo --compile ) ;;
    *) echo "gpu_check: unknown part '$p' (env cuda_tests bench study bench_bf16 tests)"; STATUS[$p]="unknown" ;;
  esac
done
# the study's results as two files of $OUT's top level (a folder two deep comes back too, but keep the count at 8)
for f in results.md results.json; do [ -f "$OUT/study/$f" ] && mv "$OUT/study/$f" "$OUT/study_$f"; done
[ -d "$OUT/study" ] && rmdir "$OUT/study" 2>/dev/null

echo; echo "==================== summary ($(( $(date +%s) - T0 ))s) ===================="
for p in "${parts[@]}"; do echo "$p: ${STATUS[$p]:-not run}"; done
for f in test_cuda.txt tests_cuda.txt; do [ -f "$OUT/$f" ] && { echo "-- $f"; grep -E '^(FAILED|ERROR)|passed|failed|skipped|xfail' "$OUT/$f" | tail -12; }; done
for f in bench_fp32.txt bench_bf16.txt; do [ -f "$OUT/$f" ] && { echo "-- $f"; grep -E '^# bench_gpu|target|/ |compiled|speed-up|^# total' "$OUT/$f"; }; done
[ -f "$OUT/study.txt" ] && { echo "-- study"; grep -E 'calibration|plan \(|^# total' "$OUT/study.txt"; }
ls -l "$OUT"
