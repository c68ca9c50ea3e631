#!/usr/bin/env bash
# The one prepared GPU run, inside a 6-minute device call: its step time limits add up to at most 330 s.
#   1. preflight (first second): the C compiler and Python.h Triton needs to build each kernel's launcher, and torch,
#      triton and pytest importable; it says plainly what is missing and stops (exit status 2)
#   2. env: versions, and the GPU as torch sees it; stops the script with one error line when torch sees no GPU
#      (everything after would run on the interpreter or skip)
#   3. compile: every kernel variant the later steps launch, compiled with all the machine's cores into Triton's
#      on-disk cache (benchmarks/compile_cost.py --warm) while the torch.compile CE baseline compiles beside it; then
#      bench_ops.py --warm-only calls each benchmarked implementation once, its kernels from the cache. Nothing in
#      this step is timed, and no warm-up runs after it
#   4. tests: the kernel tests on the GPU in TEST_PROCS processes, each a contiguous block of them (pytest_shard.py,
#      no pytest-xdist needed), loading the compiled kernels from the cache; it prints how many kernels they still had
#      to compile themselves
#   5. bench_ops rows in decision order: CE at the ImageNet-1K shape (the headline target; default split of an fp32 w
#      against exact fp32), the small-ridge one-launch kernel against the blocked path (small_ridge.MAX_SIZE), the
#      Cholesky block width and warps, ridge m = 1000 / 10000 against cuSOLVER, Gram
#   6. bench_step at the ImageNet-1K shape (ViT-B/14 at 224 px, m = 1000, 1.28 M real features), then the torch.compile
#      CE baseline (ImageNet-1K only)
# benchmarks/RESULTS.md ("gpu_check.sh's steps on a 16-core GPU machine") derives each step's limit from the compile
# times measured on a CPU. Every exit (end, failure, time limit, Ctrl-C) prints which steps finished and which
# benchmark rows were written. Logs go under $OUT when set (else benchmarks/gpu_logs/), the benchmark rows to
# $OUT/bench_rows.md: paste them into benchmarks/RESULTS.md.
#
#   CLPDD_COMMIT=<git sha> bash benchmarks/gpu_check.sh          # from the repository root
#   QUICK=1 bash benchmarks/gpu_check.sh                          # dry run (any machine): the preflight for real,
#                                                                 # then every step in order with its limit, not run
#
# Import path: setup.py maps the folder kernels/ to clpdd_fast.kernels, so a plain PYTHONPATH=. cannot import it.
# Rather than pip-installing into the machine's Python, this script stages a copy laid out as installed
# ($STAGE/clpdd_fast/kernels/...) plus tests/, benchmarks/ and tools/, and runs everything from there. No network
# needed: it relies on the machine's python3 having torch, triton and pytest (the GPU image does).
set -u
PY="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
JOBS="${JOBS:-$(nproc)}"        # compile processes: every core
TEST_PROCS="${TEST_PROCS:-8}"   # processes for the kernel tests (they share the one GPU)

# ---- 1. preflight: bash builtins and one short python call only, so that it answers within the first second
fail() { echo "gpu_check: error: $*" >&2; exit 2; }
command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY' (set PYTHON=/path/to/python3)"
[[ "$PY" != */* ]] || PY="$(cd "${PY%/*}" && pwd)/${PY##*/}"   # a relative path, made absolute: the steps run elsewhere
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
# one cache for every step: the compile step fills it, the tests and benchmarks load from it
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
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

# within COMMAND...: COMMAND under what is left of the current step's time limit (STEP_END, in $SECONDS); a function
# of this script runs as is and puts its own commands under the limit. The dry run prints a command instead.
within() {
  if declare -F "$1" >/dev/null; then "$@"; return; fi
  if [ "$QUICK" = 1 ]; then echo "[dry run]   $(printf '%q ' "$@")"; return 0; fi
  timeout --kill-after=2 $((STEP_END > SECONDS ? STEP_END - SECONDS : 1)) "$@"
}

# launch LIST LOG COMMAND...: `within COMMAND` in the background, output to $LOGS/LOG.txt, its pid appended to the
# array LIST (the dry run prints it)
launch() {
  local -n list="$1"
  local log="$2"
  shift 2
  if [ "$QUICK" = 1 ]; then echo "[dry run]   & $(printf '%q ' "$@")"; return 0; fi
  within "$@" >"$LOGS/$log.txt" 2>&1 &
  list+=($!)
}

# wait_for LIST: wait for the background commands in the array LIST; the exit status of the last that failed
wait_for() {
  local -n pids="$1"
  local pid rc=0
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  return $rc
}

# step NAME SECONDS COMMAND...: `within COMMAND` under a time limit of SECONDS, output to the terminal and
# $LOGS/NAME.txt; returns its exit status. The dry run prints the step and what it would run.
step() {
  local name="$1" limit="$2" start=$SECONDS rc
  shift 2
  STEP_END=$((SECONDS + limit))
  if [ "$QUICK" = 1 ]; then
    echo "[dry run] step $name (limit ${limit}s)"
    within "$@"
    DONE+=("$name: dry run (limit ${limit}s)")
    return 0
  fi
  echo "== $name (limit ${limit}s)" | tee "$LOGS/$name.txt"
  within "$@" 2>&1 | tee -a "$LOGS/$name.txt"
  rc=${PIPESTATUS[0]}
  DONE+=("$name: exit status $rc$([ "$rc" = 124 ] && echo ' (hit its time limit)') after $((SECONDS - start)) s")
  echo "== ${DONE[-1]}"
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

# versions, and the GPU as torch sees it; exit status 3 when torch sees none
ENV_CHECK="import sys, torch, triton, clpdd_fast.kernels.backend as b; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'import ok:', b.__file__); \
torch.cuda.is_available() or sys.exit(3); \
print('GPU:', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

# the rows that decide something, in decision order (see benchmarks/RESULTS.md), and only the shapes that decide
BENCH_OPS=(--ops ce,ridge-small,cholesky-tiles,ridge,gram --ce-shapes imagenet1k --ridge-m 1000,10000 --no-compile)
COMPILE_BASELINE=(--ops ce --ce-shapes imagenet1k --no-mixed --impls compile)

# Every kernel variant the later steps launch, compiled with all the machine's cores into Triton's cache:
# compile_cost.py --warm records the kernel tests' launches (under the interpreter, JOBS processes) and those of the
# GPU-only tests and benchmark rows, then compiles each distinct one once through the kernel's own warm-up path.
# Meanwhile the torch.compile baseline compiles (its own kernels); after it, bench_ops.py --warm-only calls each
# benchmarked implementation once (its kernels come from the cache; cuBLAS and cuSOLVER make their first calls).
compile_kernels() {
  local background=() rc=0
  launch background warm_compile_baseline "$PY" benchmarks/bench_ops.py --warm-only "${COMPILE_BASELINE[@]}"
  within "$PY" benchmarks/compile_cost.py --warm --jobs "$JOBS" || rc=$?
  within "$PY" benchmarks/bench_ops.py --warm-only "${BENCH_OPS[@]}" || rc=$?
  wait_for background || { rc=$?; echo "(the torch.compile warm-up failed: see $LOGS/warm_compile_baseline.txt)"; }
  return $rc
}

cached_kernels() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }

# The kernel tests in TEST_PROCS processes, each a contiguous block of them, so that the few variants the compile step
# missed are compiled by one process each. Fails when a shard fails.
kernel_tests() {
  local i shards=() rc=0 before
  [ "$QUICK" = 1 ] || before=$(cached_kernels)
  for ((i = 0; i < TEST_PROCS; i++)); do
    launch shards "tests_$i" env CLPDD_SHARD="$i/$TEST_PROCS" "$PY" -m pytest -q -rs -p no:cacheprovider \
      -p pytest_shard tests/test_kernel_*.py
  done
  [ "$QUICK" = 1 ] && return 0
  wait_for shards || rc=$?
  tail -n 2 "$LOGS"/tests_*.txt
  echo "kernels the tests compiled themselves (new in Triton's cache): $(($(cached_kernels) - before))"
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

step env 15 "$PY" -c "$ENV_CHECK"
ENV_STATUS=$?
[ "$ENV_STATUS" != 3 ] || fail "torch sees no GPU (torch.cuda.is_available() is False${CUDA_VISIBLE_DEVICES+, \
CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'}): a torch without CUDA or a driver too old for it; the tests would run \
on the interpreter or skip, so the run stops here"
[ "$ENV_STATUS" = 0 ] || fail "the env step failed (exit status $ENV_STATUS, see $LOGS/env.txt): nothing after it \
can run"
step compile 75 compile_kernels
step tests 40 kernel_tests
step bench_ops 80 "$PY" benchmarks/bench_ops.py --results "$ROWS" "${BENCH_OPS[@]}"
# CLP-DD's step, its one-graph twin and LGM (K = 3, as its authors ran ImageNet-1K) in one run, so the ratios are
# measured together; a variant that runs out of memory is recorded as failed, which is itself a result
step bench_step 90 "$PY" benchmarks/bench_step.py --imagenet --method clpdd,lgm --reps 2 --results "$ROWS"
step compile_baseline 30 "$PY" benchmarks/bench_ops.py --results "$ROWS" "${COMPILE_BASELINE[@]}"
exit $FAILED
