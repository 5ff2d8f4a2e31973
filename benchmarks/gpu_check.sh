#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with one CUDA GPU and no network (torch installed;
# JAX and CuPy where present), run from the repository root with wheels/ beside it (DEVELOPERS.md fills it):
#
#     bash benchmarks/gpu_check.sh            # arguments go to benchmarks/gpu.py (--dry: on the CPU)
#
# 1. installs from wheels/, into a folder of its own put first on PYTHONPATH (no permission needed), what
#    the machine lacks: array-api-compat and array-api-extra (always: the versions tested here), optax,
#    pytest, Liger-Kernel and Cut Cross-Entropy (when they do not import);
# 2. the CUDA tests (tests/frameworks/test_accelerator.py: no host synchronisation, the device-side index
#    check, CUDA graph capture, the compiled strategy, linear_cross_entropy's bfloat16 products, CuPy), at
#    most 180 s (each test reported as it ends: a run cut short still says which passed);
# 3. benchmarks/gpu.py (parity, passes, the grids; the grids' budget 240 s: what would start after it is
#    skipped), at most 300 s: benchmarks/results/gpu.md (not with --dry).
# About 8 minutes at most: with the machine's start, a device session of 15 minutes holds one run.
# The logs and the report go to $OUT too when it is set (the device tool's output folder). Python is
# $PYTHON, else python3 (the GPU image's interpreter with torch); the exit status is gpu.py's.
set -u
py=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
deps=$(mktemp -d)
mkdir -p "$out"
have() { "$py" -c "import $1" 2>/dev/null; }
wanted=(array-api-compat array-api-extra)
have optax || wanted+=(optax absl-py)
have pytest || wanted+=(pytest pluggy iniconfig packaging pygments exceptiongroup tomli)
have typing_extensions || wanted+=(typing_extensions)
have liger_kernel || wanted+=(liger-kernel)  # anchors of linear_cross_entropy's row (torch and Triton there)
have cut_cross_entropy || wanted+=(cut-cross-entropy)
if [ -d wheels ]; then
  "$py" -m pip install -q --no-index --no-deps --find-links wheels --target "$deps" "${wanted[@]}" \
    >"$out/install.log" 2>&1 || echo "install from wheels/ failed: $out/install.log"
else
  echo "no wheels/ here: nothing installed"
fi
export PYTHONPATH="$deps:$PWD"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$py" -VV; } >"$out/machine.txt" 2>&1
if have pytest; then
  MULTIXENT_BACKENDS=torch timeout 180 "$py" -m pytest -v -rs -p no:cacheprovider \
    tests/frameworks/test_accelerator.py -k "cuda or cupy" >"$out/cuda-tests.log" 2>&1
  echo "CUDA tests: exit $? ($(tail -n 1 "$out/cuda-tests.log"))"
fi
timeout 300 "$py" benchmarks/gpu.py --budget 240 --out "$out/gpu.md" "$@" >"$out/gpu.log" 2>&1
status=$?
echo "gpu.py: exit $status"
case " $* " in
  *" --dry "*) ;;  # a dry run's report is not the GPU's
  *) cp "$out/gpu.md" benchmarks/results/gpu.md 2>/dev/null ;;
esac
tail -n 25 "$out/gpu.log"
exit $status
