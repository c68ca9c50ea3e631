"""benchmarks/bench_ops.py --device cpu end to end at a tiny N: every variant measured in its own process, the rows
written, and the variants computing the same loss and dW as torch's chunked F.linear_cross_entropy."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ops  # noqa: E402


def test_cpu_mode_rows_and_agreement(tmp_path):
    rows = tmp_path / "rows.md"
    assert bench_ops.main(["--device", "cpu", "--cpu-n", "300", "--cpu-dtypes", "fp32", "--reps", "1",
                           "--no-compile", "--results", str(rows)]) == 0
    lines = [line.split(" | ") for line in rows.read_text().splitlines() if line.startswith("| N=300")]
    by_impl = {cells[2]: cells for cells in lines}
    assert set(by_impl) == {bench_ops.CPU_OURS, bench_ops.CPU_ANCHOR, bench_ops.PLAIN_ANCHOR, bench_ops.FULL_LOGITS[0]}
    if not bench_ops.TORCH_CE:
        pytest.skip(bench_ops.NO_TORCH_CE + ": the rows' anchor is missing (the plain anchor is tested below)")
    anchor_loss = float(by_impl[bench_ops.CPU_ANCHOR][9])
    for cells in lines:
        assert abs(float(cells[9]) - anchor_loss) < 1e-5 * anchor_loss   # the loss
        assert float(cells[10]) < 1e-5                                   # dW relative to F.linear_cross_entropy's
    assert float(by_impl[bench_ops.CPU_ANCHOR][7]) == 1.0   # the ratios' anchor


def test_cpu_options_are_checked():
    for argv in (["--device", "tpu"], ["--device", "cpu", "--cpu-dtypes", "fp8"]):
        with pytest.raises(SystemExit):
            bench_ops.parse_args(argv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_chunked_anchor_is_the_linear_ce_on_any_torch(dtype):
    """The anchor written with plain torch ops (for torch without F.linear_cross_entropy): the mean loss and dW of
    softmax(x w / tau) against float64 (within fp32 accumulation; bf16 operands for a bf16 x), over several chunks with
    a short last one; x frozen."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(53, 24, generator=g).to(dtype)
    w = (torch.randn(24, 11, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, 11, (53,), generator=g)
    loss = bench_ops._ce_plain_chunked(x, w, t, 0.3, chunk=16)
    (grad,) = torch.autograd.grad(3.0 * loss, w)
    wd = w.detach().double().requires_grad_()
    exact = F.cross_entropy(x.double() @ wd / 0.3, t)
    (grad_exact,) = torch.autograd.grad(3.0 * exact, wd)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - exact.item()) <= tol * exact.item() + 1e-6
    assert (grad.double() - grad_exact).abs().max() <= tol * grad_exact.abs().max() + 1e-7
