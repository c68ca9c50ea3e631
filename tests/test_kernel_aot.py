"""tools/kernel_aot.py and tools/kernel_report.py: every kernel variant the backend can dispatch compiles for sm_90 (no
GPU needed) within Hopper's shared memory and without a register spill in a loop, and the linear CE's hot kernels at the
ImageNet-1K and ImageNet-100 shapes spill nothing and feed their main loops by asynchronous copies
(CLPDD_AOT_CHECK=1, which `make test` sets); the PTX reading both rely on, on a hand-written kernel."""
import os
import subprocess
import sys

import pytest

from tools import kernel_aot as aot
from tools import kernel_report as report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

aot_check = pytest.mark.skipif(os.environ.get("CLPDD_AOT_CHECK") != "1", reason="set CLPDD_AOT_CHECK=1: compiles "
                               "kernel variants for sm_90 without a GPU (2-5 minutes on 2 cores), catching what the "
                               "interpreter accepts but the GPU would not: compile errors, shared memory beyond "
                               "Hopper's, register spills, synchronous main loops")


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    """`python tools/<tool> ARGS` from the repository root, as a user runs it (compiled kernels: no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join("tools", tool), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout)   # the table (pytest -s or -rP shows it)
    return proc


JOBS = str(os.cpu_count() or 1)


# Every variant the backend can dispatch (derived by tools/kernel_aot.py from the launchers and their constants:
# dtypes, paths, size classes, constexpr flags), compiled for sm_90 with Triton's compiler and assembled with ptxas -v;
# fails on a shared-memory overflow (Hopper: 227 KB per block) or a register spill in a dispatched kernel.
@aot_check
def test_kernels_compile_ahead_of_time_for_hopper():
    proc = _run("kernel_aot.py", "--arch", "90", "--jobs", JOBS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# The CE's kernels at the two shapes on each precision path (tools/kernel_report.py --check): fails on a spill or
# a main loop that loads an operand synchronously instead of by cp.async / TMA.
@aot_check
def test_ce_hot_kernels_have_no_spill_and_asynchronous_main_loops():
    proc = _run("kernel_report.py", "--check", "--arch", "90", "--jobs", JOBS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for shape in report.SHAPES:
        assert f"| {shape} |" in proc.stdout


# The shape of LLVM's PTX: loop annotations beside block labels, a loop's blocks not contiguous (the latch before
# the header), a fall-through block named by a comment.
PTX = """
// %bb.0:
\tld.global.b32 { %r1 }, [ %rd1 + 0 ];
$L__BB0_3:                              // %latch
                                        //   in Loop: Header=BB0_2 Depth=1
\t@%p2 ld.global.b16 { %rs1 }, [ %rd153 + 0 ];
\tbra.uni \t$L__BB0_2;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
\tcp.async.cg.shared.global [ %r17 + 0 ], [ %rd58 + 0 ], 0x10, %r18;
\tcp.async.ca.shared.global [ %r19 + 0 ], [ %rd59 + 0 ], 0x4, %r20;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
\t@%p1 bra \t$L__BB0_3;
// %bb.4:
\tst.global.b32 [ %rd9 + 0 ], { %r9 };
$L__BB0_5:                              // =>This Inner Loop Header: Depth=1
\t@%p114 ld.global.v4.b32 { %r644, %r645, %r646, %r647 }, [ %rd256 + 0 ];
\tfma.rn.f32 \t%r1, %r2, %r3, %r4;
\tfma.rn.f32 \t%r1, %r2, %r3, %r4;
\t@%p3 bra \t$L__BB0_5;
"""


def test_ptx_loops_and_the_main_loop_are_read_from_llvm_annotations():
    loops = aot.ptx_loops(PTX)
    assert set(loops) == {"BB0_2", "BB0_5"}
    assert "ld.global.b16" in loops["BB0_2"]["text"] and "st.global" not in loops["BB0_2"]["text"]
    main = aot.loop_summary(PTX)   # the tensor-core loop, although the other one has more FMA instructions
    assert (main["tensor_cores"], main["async_copies"], main["async_bytes"]) == ("wgmma", 2, 16)
    assert (main["sync_loads"], main["sync_bytes"]) == (1, 2)
    assert [(o["sync_loads"], o["sync_bytes"], o["tensor_cores"]) for o in main["others"]] == [(1, 16, "")]
    row = dict(spill=0, loop=main)
    assert report.failures(row) == ["main loop loads 1 times synchronously (<= 2 B)"]
    row = dict(spill=8, loop={**main, "sync_loads": 0, "async_copies": 0})
    assert report.failures(row) == ["spills 8 bytes per thread", "main loop without asynchronous copies"]
    assert report.failures(dict(spill=0, loop={**main, "sync_loads": 0})) == []
