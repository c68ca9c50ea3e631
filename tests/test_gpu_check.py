"""benchmarks/gpu_check.sh, the one prepared GPU run, checked on the CPU: its time budget, its preflight, its stop when
torch sees no GPU, the order of its steps (dry run, QUICK=1), that every benchmark command it runs parses, the
test-sharding plugin it uses, and how its compile step tells the kernel variants apart (benchmarks/compile_cost.py)."""
import ast
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BUDGET_S = 330   # the device call is 6 minutes: start-up, staging and the preflight need the rest
STEPS = ["env", "compile", "tests", "bench_ops", "bench_step", "compile_baseline"]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_script(tmp_path, env_extra, path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "OUT", "QUICK", "PYTHON")}
    env.update({"OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env_extra})
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)


def test_step_time_limits_sum_to_at_most_the_budget():
    steps = re.findall(r"^step (\S+) (\d+) ", SCRIPT.read_text(), re.M)
    assert [name for name, _ in steps] == STEPS
    assert sum(int(limit) for _, limit in steps) <= BUDGET_S


def dry_run_steps(out: str) -> dict[str, list[str]]:
    """{step: the lines it prints} of a dry run, in order."""
    steps: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("[dry run] step "):
            steps[line.split()[3]] = []
        elif line.startswith("[dry run]") and steps:
            steps[list(steps)[-1]].append(line)
    return steps


def test_dry_run_passes_the_preflight_and_lists_the_steps_in_order(tmp_path):
    proc = run_script(tmp_path, {"QUICK": "1", "JOBS": "16"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("preflight ok: C compiler ")
    steps = dry_run_steps(out)
    assert list(steps) == STEPS
    assert re.findall(r"^\[dry run\] step \S+ \(limit (\d+)s\)", out, re.M) == \
        re.findall(r"^step \S+ (\d+) ", SCRIPT.read_text(), re.M)
    # the compile step compiles with every core, and warms the benchmarks (the torch.compile baseline meanwhile)
    assert any("benchmarks/compile_cost.py --warm --jobs 16" in line for line in steps["compile"])
    assert [("--warm-only" in line, line.split()[2] == "&") for line in steps["compile"] if "bench_ops.py" in line] \
        == [(True, True), (True, False)]
    # the tests step runs the kernel tests only, in contiguous blocks (TEST_PROCS shards) started together
    shards = [line for line in steps["tests"] if "pytest" in line]
    assert shards == steps["tests"] and len(shards) == 8
    assert all(line.split()[2] == "&" and f"CLPDD_SHARD={i}/8" in line and "-p pytest_shard" in line
               and "test_kernel_" in line for i, line in enumerate(shards))
    # the benchmark rows in decision order, only the deciding shapes
    commands = [" ".join(cmd) for cmd in bench_commands(out)]
    assert sum("--ops ce,ridge-small,cholesky-tiles,ridge,gram --ce-shapes imagenet1k" in c for c in commands) == 2
    assert sum("--ops ce --ce-shapes imagenet1k --no-mixed --impls compile" in c for c in commands) == 2
    # the summary printed at exit names every step
    summary = out[out.index("== gpu_check summary"):]
    assert all(f"  {name}: dry run" in summary for name in STEPS)
    assert not (tmp_path / "out" / "bench_rows.md").exists()


def bench_commands(out: str) -> list[list[str]]:
    """The benchmark command lines a dry run prints, as argument lists."""
    return [shlex.split(line.split("]", 1)[1].strip().lstrip("& ")) for line in out.splitlines()
            if line.startswith("[dry run]") and "benchmarks/bench_" in line]


def test_every_benchmark_command_of_the_dry_run_parses(tmp_path):
    import bench_ops
    import bench_step
    proc = run_script(tmp_path, {"QUICK": "1"})
    commands = bench_commands(proc.stdout)
    assert len(commands) == 5
    for cmd in commands:
        script = next(i for i, word in enumerate(cmd) if word.startswith("benchmarks/bench_"))
        module = bench_ops if cmd[script].endswith("bench_ops.py") else bench_step
        module.parse_args(cmd[script + 1:])    # argparse exits (SystemExit) on a bad option or value


def test_bench_ops_rejects_an_unknown_shape_or_op():
    import bench_ops
    for argv in (["--ce-shapes", "imagenet"], ["--ops", "ce,rigde"]):
        with pytest.raises(SystemExit):
            bench_ops.parse_args(argv)


def test_preflight_says_when_no_c_compiler_is_found(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_script(tmp_path, {"QUICK": "1"}, path=str(empty))
    assert proc.returncode == 2
    assert "gpu_check: error: no C compiler ($CC, gcc or clang)" in proc.stderr
    assert "step" not in proc.stdout


def test_preflight_says_when_python_h_is_missing(tmp_path):
    fake = tmp_path / "python3"    # answers the preflight's probe like a Python without development headers
    fake.write_text(f"#!/bin/sh\nprintf '\\n{tmp_path}/include\\n'\n")
    fake.chmod(0o755)
    proc = run_script(tmp_path, {"QUICK": "1", "PYTHON": str(fake)})
    assert proc.returncode == 2
    assert f"gpu_check: error: no Python.h in {tmp_path}/include" in proc.stderr


def test_preflight_without_a_gpu_stops_a_real_run(tmp_path):
    fake = tmp_path / "nvidia-smi"   # first on PATH, fails like nvidia-smi on a machine without a GPU
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    proc = run_script(tmp_path, {"QUICK": "0"}, path=f"{tmp_path}:{os.environ['PATH']}")
    assert proc.returncode == 2 and "no GPU visible" in proc.stderr
    assert "step" not in proc.stdout


def test_a_real_run_stops_in_the_env_step_when_torch_sees_no_gpu(tmp_path):
    fake = tmp_path / "nvidia-smi"   # answers like a GPU machine's, so that the run gets past the preflight
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 580.00'\n")
    fake.chmod(0o755)
    start = time.monotonic()
    proc = run_script(tmp_path, {"QUICK": "0", "CUDA_VISIBLE_DEVICES": ""}, path=f"{tmp_path}:{os.environ['PATH']}")
    assert time.monotonic() - start < 30
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gpu_check: error:")]
    assert len(errors) == 1 and "torch sees no GPU" in errors[0], proc.stderr
    assert "== env " in proc.stdout and "== compile" not in proc.stdout
    assert "  env: exit status 3" in proc.stdout   # the summary


class _Item:
    def __init__(self, name):
        self.name = name


class _Config:
    def __init__(self):
        self.deselected = []
        self.hook = self

    def pytest_deselected(self, items):
        self.deselected += items


# Without the interpreter, with a stand-in for the driver of an H100 (its target: cuda 90, warp size 32): the hashes
# (Triton's cache keys) that the compile step's path compiles, from launches recorded, saved and loaded as meta tensors,
# and those that the same launches compile with the real tensors the kernels were called with.
WARM_KEYS = """
import tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget


class H100Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(H100Driver())
from clpdd_fast.kernels import gram
from tools import kernel_aot as aot

with aot.recording() as launches:
    gram.gram(torch.randn(64 * 32 + 1)[1:].view(64, 32), 1.0)   # rows 4 bytes off 16
    gram.gram(torch.randn(64, 32, dtype=torch.float64), 0.0)
path = tempfile.mktemp()
aot.save_launches(launches, path)
warmed = [kernel.warmup(*args, grid=(1,), **kwargs).hash for kernel, args, kwargs in aot.load_launches(path)]
for kernel, _, _ in launches:
    kernel.device_caches.clear()
launched = [kernel.warmup(*args, grid=(1,), **kwargs).hash for kernel, args, kwargs in launches]
print(len(set(warmed)), warmed == launched)
"""


def test_compile_step_writes_the_cache_entries_the_launches_look_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WARM_KEYS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distinct, same = proc.stdout.split()
    assert int(distinct) >= 3 and same == "True"


def test_compile_step_says_plainly_that_it_needs_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_cost.py"), "--warm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--warm compiles for this machine's GPU, and torch sees none" in proc.stderr


@pytest.mark.parametrize("how", ["", ",interleaved"])
def test_shard_plugin_splits_the_tests_into_disjoint_shards(monkeypatch, how):
    import pytest_shard
    names = [f"t{i}" for i in range(11)]
    shards = []
    for i in range(3):
        monkeypatch.setenv("CLPDD_SHARD", f"{i}/3{how}")
        items, config = [_Item(n) for n in names], _Config()
        pytest_shard.pytest_collection_modifyitems(config, items)
        assert sorted(item.name for item in items + config.deselected) == sorted(names)
        shards.append([item.name for item in items])
    assert sorted(sum(shards, [])) == sorted(names)            # every test in exactly one shard
    assert {len(shard) for shard in shards} == {3, 4}          # as equal as they can be
    if how:   # every third test, from the i-th
        assert shards == [names[0::3], names[1::3], names[2::3]]
    else:     # contiguous blocks, in order
        assert sum(shards, []) == names
    monkeypatch.setenv("CLPDD_SHARD", f"4/5{how}")
    items = [_Item(n) for n in names[:2]]                      # fewer tests than shards: some shards are empty
    pytest_shard.pytest_collection_modifyitems(_Config(), items)
    assert [item.name for item in items] == ([] if how else ["t1"])
    monkeypatch.delenv("CLPDD_SHARD")
    items = [_Item(n) for n in names]
    pytest_shard.pytest_collection_modifyitems(_Config(), items)
    assert len(items) == len(names)
    for bad in ("3/3", "-1/3", "a/b", "3", "1/3,blocks"):
        with pytest.raises(ValueError, match="CLPDD_SHARD"):
            pytest_shard.shard(bad)


# Run without the interpreter (the compile step needs Triton's compiled kernels): the indices of the launches that
# compile_cost.distinct keeps, on meta tensors, and the number of launches of one gram call
DISTINCT = """
import torch
import compile_cost
from clpdd_fast.kernels import gram
from tools import kernel_aot as aot

phi = torch.empty(64, 32, device="meta")
shifted = torch.empty(64 * 32 + 1, device="meta")[1:].view(64, 32)   # its rows start 4 bytes off 16
with aot.recording() as launches:
    for x, lam in ((phi, 1.0), (phi, 1.0), (shifted, 1.0), (phi, 0.0)):   # lam 0: no diagonal added
        gram.gram(x, lam)
print(len(launches) // 4, [next(i for i, launch in enumerate(launches) if launch[0] is v.launch[0]
                                and launch[1] is v.launch[1]) for v in compile_cost.distinct(launches).values()])
"""


def test_compile_step_compiles_each_distinct_variant_once():
    """Launches that compile the same code count once, by their first launch; another alignment of a pointer or
    another constexpr is another variant (benchmarks/compile_cost.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", DISTINCT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls, chosen = proc.stdout.split(maxsplit=1)
    calls, chosen = int(calls), ast.literal_eval(chosen)
    assert chosen == sorted(chosen) and chosen[:calls] == list(range(calls))
    assert [any(i // calls == call for i in chosen) for call in range(4)] == [True, False, True, True]


def test_bench_step_takes_the_new_flags_and_the_old_ones_with_a_note(capsys):
    import bench_step
    args = bench_step.parse_args(["--encoder-batch", "4", "--encoder-dtype", "bf16"])
    assert (args.encoder_batch, args.encoder_dtype) == (4, "bf16")
    old = bench_step.parse_args(["--chunk-size", "4", "--precision", "bf16"])
    assert (old.encoder_batch, old.encoder_dtype) == (4, "bf16")
    err = capsys.readouterr().err
    assert "note: --chunk-size is now --encoder-batch" in err and "note: --precision is now --encoder-dtype" in err
