"""benchmarks/bench_ops.py --device cpu end to end at a tiny N: every variant measured in its own process, the rows
written, and the variants computing the same loss and dW as torch's chunked F.linear_cross_entropy."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ops  # noqa: E402


def test_cpu_mode_rows_and_agreement(tmp_path):
    rows = tmp_path / "rows.md"
    assert bench_ops.main(["--device", "cpu", "--cpu-n", "300", "--cpu-dtypes", "fp32", "--reps", "1",
                           "--no-compile", "--results", str(rows)]) == 0
    lines = [line.split(" | ") for line in rows.read_text().splitlines() if line.startswith("| N=300")]
    by_impl = {cells[2]: cells for cells in lines}
    assert set(by_impl) == {bench_ops.CPU_OURS, bench_ops.CPU_ANCHOR, bench_ops.FULL_LOGITS[0]}
    anchor_loss = float(by_impl[bench_ops.CPU_ANCHOR][9])
    for cells in lines:
        assert abs(float(cells[9]) - anchor_loss) < 1e-5 * anchor_loss   # the loss
        assert float(cells[10]) < 1e-5                                   # dW relative to F.linear_cross_entropy's
    assert float(by_impl[bench_ops.CPU_ANCHOR][7]) == 1.0   # the ratios' anchor


def test_cpu_options_are_checked():
    for argv in (["--device", "tpu"], ["--device", "cpu", "--cpu-dtypes", "fp8"]):
        with pytest.raises(SystemExit):
            bench_ops.parse_args(argv)
