#!/usr/bin/env bash
# The one prepared GPU run, inside a 6-minute device call: its step time limits add up to at most 330 s.
#   1. preflight (first second): the C compiler and Python.h Triton needs to build each kernel's launcher, and torch,
#      triton and pytest importable; it says plainly what is missing and stops (exit status 2)
#   2. the kernel tests on the GPU: the GPU-only ones (test_gpu_*: bf16, large shapes, bitwise determinism, memory)
#      start first, in their own processes; the rest are spread over more processes (no pytest-xdist needed); the
#      benchmarks' kernels and the torch.compile baseline compile meanwhile in the background (--warm-only), so the
#      timed steps below find the caches warm
#   3. bench_ops rows in decision order: CE at the ImageNet-1K shape (the headline target; default split of an fp32 w
#      against exact fp32), the small-ridge one-launch kernel against the blocked path (small_ridge.MAX_SIZE), the
#      Cholesky block width and warps, ridge m = 1000 / 10000 against cuSOLVER, Gram
#   4. bench_step at the ImageNet-1K shape (ViT-B/14 at 224 px, m = 1000, 1.28 M real features), then the torch.compile
#      CE baseline (ImageNet-1K only)
# Every exit (end, failure, time limit, Ctrl-C) prints which steps finished and which benchmark rows were written.
# Logs go under $OUT when set (else benchmarks/gpu_logs/), the benchmark rows to $OUT/bench_rows.md: paste them into
# benchmarks/RESULTS.md.
#
#   CLPDD_COMMIT=<git sha> bash benchmarks/gpu_check.sh          # from the repository root
#   QUICK=1 bash benchmarks/gpu_check.sh                          # dry run (any machine): the preflight for real,
#                                                                 # then every step in order with its limit, not run
#
# Import path: setup.py maps the folder kernels/ to clpdd_fast.kernels, so a plain PYTHONPATH=. cannot import it.
# Rather than pip-installing into the machine's Python, this script stages a copy laid out as installed
# ($STAGE/clpdd_fast/kernels/...) plus tests/ and benchmarks/, and runs everything from there. No network needed:
# it relies on the machine's python3 having torch, triton and pytest (the GPU image does).
set -u
PY="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
TEST_PROCS="${TEST_PROCS:-8}"   # processes for the kernel tests: 2 for the GPU-only ones, the rest for the others

# ---- 1. preflight: bash builtins and one short python call only, so that it answers within the first second
fail() { echo "gpu_check: error: $*" >&2; exit 2; }
command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY' (set PYTHON=/path/to/python3)"
# the compiler Triton picks: $CC, else gcc, else clang (triton/runtime/build.py)
CC_USED="${CC:-}"
if [ -z "$CC_USED" ]; then
  for c in gcc clang; do
    if command -v "$c" >/dev/null 2>&1; then CC_USED="$c"; break; fi
  done
fi
[ -n "$CC_USED" ] && command -v "${CC_USED%% *}" >/dev/null 2>&1 || fail "no C compiler (\$CC, gcc or clang): \
Triton builds each kernel's launcher with one at first launch, so every launch would fail; install gcc (this \
machine reaches no package registry: use an image that has it)"
PROBE="$("$PY" -c "
import importlib.util, sysconfig
scheme = sysconfig.get_default_scheme()
scheme = 'posix_prefix' if scheme == 'posix_local' else scheme   # what triton/runtime/build.py does
print(' '.join(m for m in ('torch', 'triton', 'pytest') if importlib.util.find_spec(m) is None))
print(sysconfig.get_paths(scheme=scheme)['include'])")" \
  || fail "'$PY' does not run"
PY_MISSING="${PROBE%%$'\n'*}"
PY_INCLUDE="${PROBE#*$'\n'}"
[ -z "$PY_MISSING" ] || fail "'$PY' cannot import: $PY_MISSING"
[ -f "$PY_INCLUDE/Python.h" ] || fail "no Python.h in $PY_INCLUDE (the Python development headers): Triton \
compiles each kernel's launcher against it at first launch, so every launch would fail"
CC_LOG="$(echo '#include <Python.h>' | $CC_USED -fsyntax-only -I"$PY_INCLUDE" -x c - 2>&1)" \
  || fail "the C compiler '$CC_USED' cannot compile against $PY_INCLUDE/Python.h: ${CC_LOG:0:300}"
if [ "$QUICK" != 1 ]; then
  GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)" \
    || fail "no GPU visible (nvidia-smi fails: ${GPU:0:200}); QUICK=1 runs a dry run anywhere"
  echo "GPU: $GPU"
fi
echo "preflight ok: C compiler $CC_USED, $PY_INCLUDE/Python.h, torch + triton + pytest importable"

# ---- the steps
ROOT="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"
LOGS="${OUT:-$ROOT/benchmarks/gpu_logs}"
mkdir -p "$LOGS"
ROWS="$LOGS/bench_rows.md"
export CLPDD_COMMIT="${CLPDD_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
DONE=()        # one line per step: name, exit status, seconds
FAILED=0
STAGE=""

summary() {
  [ -n "$STAGE" ] && rm -rf "$STAGE"
  echo "== gpu_check summary ($SECONDS s)"
  if [ ${#DONE[@]} = 0 ]; then echo "no step finished"; else printf '  %s\n' "${DONE[@]}"; fi
  if [ -f "$ROWS" ]; then
    echo "benchmark rows written to $ROWS (op | shape | dtype | impl):"
    grep '^| ' "$ROWS" | grep -v '^| op \|^| method ' | cut -d'|' -f2-5 | sed 's/^/  /'
  else
    echo "no benchmark rows written"
  fi
}
trap summary EXIT
trap 'echo "gpu_check: interrupted"; exit 130' INT TERM

# step NAME SECONDS COMMAND...: COMMAND under a time limit, output to the terminal and $LOGS/NAME.txt. A function of
# this script runs as is and puts its own processes under the limit (STEP_LIMIT). The dry run prints the command
# instead (a function prints what it would launch).
step() {
  local name="$1" limit="$2" start=$SECONDS rc
  shift 2
  if [ "$QUICK" = 1 ]; then
    echo "[dry run] step $name (limit ${limit}s)"
    if declare -F "$1" >/dev/null; then "$@"; else echo "[dry run]   $(printf '%q ' "$@")"; fi
    DONE+=("$name: dry run (limit ${limit}s)")
    return 0
  fi
  echo "== $name (limit ${limit}s)" | tee "$LOGS/$name.txt"
  if declare -F "$1" >/dev/null; then
    STEP_LIMIT="$limit" "$@" 2>&1 | tee -a "$LOGS/$name.txt"
  else
    timeout --kill-after=2 "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.txt"
  fi
  rc=${PIPESTATUS[0]}
  DONE+=("$name: exit status $rc$([ "$rc" = 124 ] && echo ' (hit its time limit)') after $((SECONDS - start)) s")
  echo "== ${DONE[-1]}"
  [ "$rc" = 0 ] || FAILED=1
  return 0
}

# launch LIST LOG COMMAND...: COMMAND in the background under the step's time limit, output to $LOGS/LOG.txt, its pid
# appended to the array LIST (the dry run prints it)
launch() {
  local -n list="$1"
  local log="$2"
  shift 2
  if [ "$QUICK" = 1 ]; then echo "[dry run]   & $(printf '%q ' "$@")"; return 0; fi
  timeout --kill-after=2 "$STEP_LIMIT" "$@" >"$LOGS/$log.txt" 2>&1 &
  list+=($!)
}

# The kernel tests in TEST_PROCS processes: shards of the GPU-only tests start first, then shards of the others; the
# benchmarks' kernels and the torch.compile baseline compile meanwhile (untimed, --warm-only), and the step waits for
# them too, so that no compilation overlaps a timed benchmark. Fails when a test shard fails.
kernel_tests_and_warm_ups() {
  local gpu_procs=2 i tests=() warm=() rc=0 pid
  local rest=$((TEST_PROCS > gpu_procs ? TEST_PROCS - gpu_procs : 1))
  for ((i = 0; i < gpu_procs; i++)); do
    launch tests "tests_gpu_only_$i" env CLPDD_SHARD="$i/$gpu_procs" "$PY" -m pytest -q -rs -p no:cacheprovider \
      -p pytest_shard tests/test_kernel_*.py -k test_gpu_
  done
  for ((i = 0; i < rest; i++)); do
    launch tests "tests_other_$i" env CLPDD_SHARD="$i/$rest" "$PY" -m pytest -q -rs -p no:cacheprovider \
      -p pytest_shard tests/test_kernel_*.py -k "not test_gpu_"
  done
  launch warm warm_bench_ops "$PY" benchmarks/bench_ops.py --warm-only "${BENCH_OPS[@]}"
  launch warm warm_compile_baseline "$PY" benchmarks/bench_ops.py --warm-only "${COMPILE_BASELINE[@]}"
  [ "$QUICK" = 1 ] && return 0
  for pid in "${tests[@]}"; do wait "$pid" || rc=1; done
  for pid in "${warm[@]}"; do wait "$pid" || echo "(a warm-up failed: see $LOGS/warm_*.txt)"; done
  tail -n 2 "$LOGS"/tests_*.txt "$LOGS"/warm_*.txt
  return $rc
}

if [ "$QUICK" != 1 ]; then
  STAGE="$(mktemp -d)"
  mkdir -p "$STAGE/clpdd_fast/kernels"
  cp -r "$ROOT"/clpdd_fast/. "$STAGE/clpdd_fast/"
  cp -r "$ROOT"/kernels/. "$STAGE/clpdd_fast/kernels/"
  cp -r "$ROOT/tests" "$ROOT/benchmarks" "$ROOT/tools" "$ROOT/pytest.ini" "$STAGE/"
  find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
  cd "$STAGE" || exit 1
  export PYTHONPATH="$STAGE:$STAGE/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
fi
unset TRITON_INTERPRET

step env 20 "$PY" -c "import sys, torch, triton, clpdd_fast.kernels.backend as b; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); \
print('import ok:', b.__file__)"

# the rows that decide something, in decision order (see benchmarks/RESULTS.md), and only the shapes that decide
BENCH_OPS=(--ops ce,ridge-small,cholesky-tiles,ridge,gram --ce-shapes imagenet1k --ridge-m 1000,10000 --no-compile)
COMPILE_BASELINE=(--ops ce --ce-shapes imagenet1k --no-mixed --impls compile)
step tests 110 kernel_tests_and_warm_ups
step bench_ops 80 "$PY" benchmarks/bench_ops.py --results "$ROWS" "${BENCH_OPS[@]}"
# CLP-DD's step, its one-graph twin and LGM (K = 3, as its authors ran ImageNet-1K) in one run, so the ratios are
# measured together; a variant that runs out of memory is recorded as failed, which is itself a result
step bench_step 90 "$PY" benchmarks/bench_step.py --imagenet --method clpdd,lgm --reps 2 --results "$ROWS"
step compile_baseline 30 "$PY" benchmarks/bench_ops.py --results "$ROWS" "${COMPILE_BASELINE[@]}"
exit $FAILED
