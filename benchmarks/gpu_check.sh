#!/usr/bin/env bash
# The one prepared GPU run (at most 6 minutes): the kernel tests on the GPU, GPU-only ones included (bf16, large
# shapes, bitwise determinism, memory), then bench_ops at the shapes of the issue, then bench_step at the ImageNet-1K
# shape (ViT-B/14 at 224 px, m = 1000, 1.28 M real features), then the torch.compile baselines. Logs go under $OUT when set
# (else benchmarks/gpu_logs/), and the benchmark rows to $OUT/bench_rows.md: paste them into benchmarks/RESULTS.md.
#
#   CLPDD_COMMIT=<git sha> bash benchmarks/gpu_check.sh          # from the repository root
#   QUICK=1 bash benchmarks/gpu_check.sh                          # smoke shapes only
#
# Import path: setup.py maps the folder kernels/ to clpdd_fast.kernels, so a plain PYTHONPATH=. cannot import it.
# Rather than pip-installing into the machine's Python, this script stages a copy laid out as installed
# ($STAGE/clpdd_fast/kernels/...) plus tests/ and benchmarks/, and runs everything from there. No network needed:
# it relies on the machine's python3 having torch, triton and pytest (the GPU image does).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGS="${OUT:-$ROOT/benchmarks/gpu_logs}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export CLPDD_COMMIT="${CLPDD_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"

STAGE="$(mktemp -d)"
mkdir -p "$STAGE/clpdd_fast/kernels"
cp -r "$ROOT"/clpdd_fast/. "$STAGE/clpdd_fast/"
cp -r "$ROOT"/kernels/. "$STAGE/clpdd_fast/kernels/"
cp -r "$ROOT/tests" "$ROOT/benchmarks" "$STAGE/"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
cd "$STAGE" || exit 1
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  echo "== gpu_check $(date -u +%FT%TZ) commit $CLPDD_COMMIT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import clpdd_fast.kernels.backend as b; print('import ok:', b.__file__)"
} 2>&1 | tee "$LOGS/env.txt"

echo "== kernel tests (GPU)" | tee "$LOGS/tests.txt"
# every kernel specialisation compiles on first use (about a second each): spread them over processes when
# pytest-xdist is there (the GPU image has it); the Triton cache on disk is shared between the workers
PARALLEL=()
if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); fi
timeout 100 "$PY" -m pytest -q -rs -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} tests/test_kernels.py 2>&1 | tee -a "$LOGS/tests.txt"
TEST_RC=${PIPESTATUS[0]}
echo "tests exit status: $TEST_RC" | tee -a "$LOGS/tests.txt"

echo "== bench_ops" | tee "$LOGS/bench.txt"
BENCH_ARGS=(--results "$LOGS/bench_rows.md")
if [ "${QUICK:-0}" = 1 ]; then BENCH_ARGS+=(--quick); fi
# rows are appended as they are measured, so a timeout still leaves the finished ones; the torch.compile
# baselines (about a minute of compilation each) run last, in their own time slot
timeout 110 "$PY" benchmarks/bench_ops.py "${BENCH_ARGS[@]}" --no-compile 2>&1 | tee -a "$LOGS/bench.txt"
BENCH_RC=${PIPESTATUS[0]}
echo "bench exit status: $BENCH_RC (124 = hit the time limit)" | tee -a "$LOGS/bench.txt"
echo "== bench_step (ImageNet-1K shape)" | tee -a "$LOGS/bench.txt"
# CLP-DD's step, its one-graph twin and LGM (K = 3, as its authors ran ImageNet-1K) in one run, so the ratios are
# measured together; a variant that runs out of memory is recorded as failed, which is itself a result
timeout 110 "$PY" benchmarks/bench_step.py --imagenet --method clpdd,lgm --reps 2 --results "$LOGS/bench_rows.md" \
  2>&1 | tee -a "$LOGS/bench.txt"
echo "bench_step exit status: ${PIPESTATUS[0]}" | tee -a "$LOGS/bench.txt"
timeout 40 "$PY" benchmarks/bench_ops.py "${BENCH_ARGS[@]}" --ops ce --no-mixed --impls compile 2>&1 \
  | tee -a "$LOGS/bench.txt"
echo "compile baselines exit status: ${PIPESTATUS[0]}" | tee -a "$LOGS/bench.txt"
rm -rf "$STAGE"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
