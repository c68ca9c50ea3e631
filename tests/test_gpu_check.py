"""benchmarks/gpu_check.sh, the one prepared GPU run, checked on the CPU: its time budget, its preflight, the order of
its steps (dry run, QUICK=1), that every benchmark command it runs parses, and the test-sharding plugin it uses."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BUDGET_S = 330   # the device call is 6 minutes: start-up, staging and the preflight need the rest
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
    names = [name for name, _ in steps]
    assert names == ["env", "tests", "bench_ops", "bench_step", "compile_baseline"], names
    assert sum(int(limit) for _, limit in steps) <= BUDGET_S


def test_dry_run_passes_the_preflight_and_lists_the_steps_in_order(tmp_path):
    proc = run_script(tmp_path, {"QUICK": "1"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("preflight ok: C compiler ")
    lines = [line for line in out.splitlines() if line.startswith("[dry run]")]
    launches = [line for line in lines if "&" in line.split()[:3]]
    # the GPU-only tests are launched before the other tests, the warm-ups after both, all inside the tests step
    kinds = ["gpu" if "-k test_gpu_" in line else "other" if "not\\ test_gpu_" in line else "warm"
             for line in launches]
    assert kinds == sorted(kinds, key=["gpu", "other", "warm"].index) and set(kinds) == {"gpu", "other", "warm"}
    assert all("CLPDD_SHARD=" in line and "-p pytest_shard" in line for line in launches if "pytest" in line)
    steps = [line.split()[3] for line in lines if line.startswith("[dry run] step ")]
    assert steps == ["env", "tests", "bench_ops", "bench_step", "compile_baseline"]
    # the benchmark rows in decision order, only the deciding shapes
    commands = [" ".join(cmd) for cmd in bench_commands(out)]
    assert sum("--ops ce,ridge-small,cholesky-tiles,ridge,gram --ce-shapes imagenet1k" in c for c in commands) == 2
    assert sum("--ops ce --ce-shapes imagenet1k --no-mixed --impls compile" in c for c in commands) == 2
    # the summary printed at exit names every step
    summary = out[out.index("== gpu_check summary"):]
    assert all(f"  {name}: dry run" in summary for name in steps)
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


class _Item:
    def __init__(self, name):
        self.name = name


class _Config:
    def __init__(self):
        self.deselected = []
        self.hook = self

    def pytest_deselected(self, items):
        self.deselected += items


def test_shard_plugin_splits_the_tests_into_disjoint_shards(monkeypatch):
    import pytest_shard
    names = [f"t{i}" for i in range(11)]
    kept = []
    for i in range(3):
        monkeypatch.setenv("CLPDD_SHARD", f"{i}/3")
        items, config = [_Item(n) for n in names], _Config()
        pytest_shard.pytest_collection_modifyitems(config, items)
        assert len(items) + len(config.deselected) == len(names)
        kept += [item.name for item in items]
    assert sorted(kept) == sorted(names)          # every test in exactly one shard
    monkeypatch.delenv("CLPDD_SHARD")
    items = [_Item(n) for n in names]
    pytest_shard.pytest_collection_modifyitems(_Config(), items)
    assert len(items) == len(names)
    for bad in ("3/3", "-1/3", "a/b", "3"):
        with pytest.raises(ValueError, match="CLPDD_SHARD"):
            pytest_shard.shard(bad)


def test_bench_step_takes_the_new_flags_and_the_old_ones_with_a_note(capsys):
    import bench_step
    args = bench_step.parse_args(["--encoder-batch", "4", "--encoder-dtype", "bf16"])
    assert (args.encoder_batch, args.encoder_dtype) == (4, "bf16")
    old = bench_step.parse_args(["--chunk-size", "4", "--precision", "bf16"])
    assert (old.encoder_batch, old.encoder_dtype) == (4, "bf16")
    err = capsys.readouterr().err
    assert "note: --chunk-size is now --encoder-batch" in err and "note: --precision is now --encoder-dtype" in err
