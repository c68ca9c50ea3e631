"""kernels/linear_ce.py (fused linear softmax CE and its chunked backward) against float64, directly and through the
public op, under Triton's interpreter on CPU tensors without CUDA (tests/conftest.py sets TRITON_INTERPRET=1),
compiled with CUDA.

Shapes are small and odd so that every dimension has a masked tail; tiles are >= 16 (GPU tl.dot minimum).
"""
import inspect

import pytest
import torch

from helpers import (DEVICE, check_kernels_can_run, close_to_exact, gpu_only, labels, rand, tol_for,
                     worst_element)

check_kernels_can_run()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ce_split_bound import assert_within_split_bound  # noqa: E402
from clpdd_fast import ops, reference  # noqa: E402
from clpdd_fast.kernels import linear_ce as kce  # noqa: E402
from clpdd_fast.kernels import tiles  # noqa: E402
from clpdd_fast.kernels.contract import CEParams  # noqa: E402

# several tiles in every dimension at the test shapes
SMALL = {"BLOCK_ROWS": 16, "BLOCK_CLASSES": 16, "BLOCK_FEATURES": 16}


CE_SHAPE = (37, 19, 23)   # N, d, C: tails in every dimension with 16-wide tiles


def fp16_coef_bound(x, w, t, tau, g):
    """What storing the coefficients in fp16 (the fp16 path, for tensor-core dX / dW products) adds to dX and dW,
    elementwise, in float64. The kernels store coef' = (softmax - onehot) g_i / max|g| in [-1, 1], rounded to fp16:
    at most 2^-11 |coef'| (unit roundoff) for normal numbers, 2^-25 (half the smallest subnormal) below 2^-14; in the
    gradients' units coef = coef' max|g| / tau. dX = coef w^T and dW = x^T coef take |w| and |x| times that."""
    xd, wd = x.double(), w.double()
    z = xd @ wd / tau
    known = (t >= 0) & (t < w.shape[1])
    onehot = torch.nn.functional.one_hot(torch.where(known, t, 0).long(), w.shape[1]).double() * known[:, None]
    coef = (torch.softmax(z, 1) - onehot) * (g.double() / tau)[:, None]
    dc = 2.0**-11 * coef.abs() + 2.0**-25 * g.double().abs().max() / tau
    return dict(gx=dc @ wd.abs().T, gw=xd.abs().T @ dc)


def check_gradients(gx, gw, x, w, t, tau, g, tol):
    """dX and dW (either may be None) against float64 like `close_to_exact` (torch's fp32 result as the yardstick);
    on the fp16 path within that plus the fp16 coefficients' derived bound, elementwise (tol relative to the largest
    exact value, however small)."""
    xd, wd = x.double(), w.double()
    _, lse_ex = reference.linear_ce_forward(xd, wd, t, CEParams(tau, -100, len(t), "high"))
    _, lse_ref = reference.linear_ce_forward(x, w, t, CEParams(tau, -100, len(t), "high"))
    exact = reference.linear_ce_backward(xd, wd, t, lse_ex, g.double(), CEParams(tau, -100, len(t), "high"), True, True)
    ref = reference.linear_ce_backward(x, w, t, lse_ref, g.to(lse_ref.dtype), CEParams(tau, -100, len(t), "high"),
                                       True, True)
    bound = fp16_coef_bound(x, w, t, tau, g) if x.dtype == torch.float16 else None
    for name, fast, r, e in (("gx", gx, ref[0], exact[0]), ("gw", gw, ref[1], exact[1])):
        if fast is None:
            continue
        if bound is None:
            close_to_exact(fast, r, e, tol)
            continue
        err = (fast.double() - e).abs()
        allowed = 2 * (r.double() - e).abs().max() + 1.01 * bound[name] + tol * e.abs().max()
        assert (err <= allowed).all(), f"{name}: {worst_element(fast.double(), e, err - allowed, allowed)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("tau", [0.03, 1.0, 50.0])
def test_linear_ce_forward_backward_match_float64(dtype, tau):
    n, d, num_classes = CE_SHAPE
    x = rand(n, d, dtype=dtype, seed=1)
    w = rand(d, num_classes, dtype=dtype, seed=2, scale=0.5)
    t = labels(n, num_classes, ignore=(3, 36))
    loss, lse = kce.linear_ce_forward(x, w, t, CEParams(tau, -100, 16, "high"), blocks=SMALL)
    loss_ref, lse_ref = reference.linear_ce_forward(x, w, t, CEParams(tau, -100, 16, "high"))
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, CEParams(tau, -100, 16, "high"))
    tol = tol_for(dtype) * 10
    close_to_exact(loss, loss_ref, loss_ex, tol)
    close_to_exact(lse, lse_ref, lse_ex, tol)
    assert loss[3] == 0 and loss[36] == 0
    grad_rows = rand(n, dtype=lse.dtype, seed=9).abs() * (t != -100)
    gx, gw = kce.linear_ce_backward(x, w, t, lse, grad_rows, CEParams(tau, -100, 16, "high"), True, True,
                                    blocks=SMALL, k_slices=2)
    check_gradients(gx, gw, x, w, t, tau, grad_rows, tol)
    assert torch.all(gx[3] == 0)


# (N, d, C): several class tiles (C_pad = 32, the logits go through the scratch), and one (C_pad = 16: in registers)
FUSED_SHAPES = [(37, 19, 23), (29, 21, 13)]


def _ce_case(shape, dtype, seed=0):
    """x, w, targets (rows 3 and N - 1 ignored, row 5 out of range) and per-row weights (0 on ignored rows)."""
    n, d, num_classes = shape
    x = rand(n, d, dtype=dtype, seed=seed + 1)
    w = rand(d, num_classes, dtype=dtype, seed=seed + 2, scale=0.5)
    t = labels(n, num_classes, seed=seed, ignore=(3, n - 1))
    t[5] = num_classes + 4
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = (rand(n, dtype=acc, seed=seed + 9).abs() + 0.1) * (t != -100)
    return x, w, t, g


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("k_slices,chunk_size", [(1, 1000), (2, 20), (3, 16)])
def test_fused_forward_backward_matches_float64(shape, dtype, k_slices, chunk_size):
    """Losses, logsumexps and both gradients of the one-pass CE against float64, every row chunk (20: not a multiple
    of the 16-row blocks), slice count, dtype and class-tile case; ignored rows lose 0 and get no gradient, an
    out-of-range target gives a NaN loss."""
    x, w, t, g = _ce_case(shape, dtype)
    tau = 0.07
    loss, lse, gx, gw = kce.linear_ce_forward_backward(x, w, t, g, CEParams(tau, -100, chunk_size, "high"), True,
                                                       True, blocks=SMALL, k_slices=k_slices)
    loss_ref, lse_ref = reference.linear_ce_forward(x, w, t, CEParams(tau, -100, chunk_size, "high"))
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, CEParams(tau, -100, chunk_size, "high"))
    tol = tol_for(dtype) * 10
    n = shape[0]
    assert torch.isnan(loss[5]) and loss[3] == 0 and loss[n - 1] == 0
    counted = torch.ones(n, dtype=torch.bool)
    counted[5] = False
    close_to_exact(loss[counted], loss_ref[counted], loss_ex[counted], tol)
    close_to_exact(lse, lse_ref, lse_ex, tol)
    check_gradients(gx, gw, x, w, t, tau, g, tol)
    assert torch.all(gx[3] == 0) and torch.all(gx[n - 1] == 0)


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("need_x,need_w", [(True, False), (False, True), (False, False)])
def test_fused_forward_backward_flags(shape, need_x, need_w):
    x, w, t, g = _ce_case(shape, torch.float32, seed=3)
    loss, lse, gx, gw = kce.linear_ce_forward_backward(x, w, t, g, CEParams(0.5, -100, 16, "highest"), need_x, need_w,
                                                       blocks=SMALL, k_slices=2)
    assert (gx is None) == (not need_x) and (gw is None) == (not need_w)
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, CEParams(0.5, -100, 16, "high"))
    close_to_exact(lse, reference.linear_ce_forward(x, w, t, CEParams(0.5, -100, 16, "high"))[1], lse_ex, 2e-4)
    check_gradients(gx, gw, x, w, t, 0.5, g, 2e-4)


def test_fp16_coefficients_keep_their_precision_at_small_row_weights():
    """The mean over a million rows weights each row by 1e-6: with tau = 0.05 the coefficients are ~1e-6 p, deep in
    fp16's subnormals (below 6e-5) unless scaled. Both backward paths stay within the fp16 coefficients' bound."""
    x, w, t, _ = _ce_case(CE_SHAPE, torch.float16, seed=5)
    g = torch.full((len(t),), 1e-6, device=DEVICE) * (t != -100)
    tau = 0.05
    _, lse, gx, gw = kce.linear_ce_forward_backward(x, w, t, g, CEParams(tau, -100, 16, "high"), True, True,
                                                    blocks=SMALL, k_slices=2)
    check_gradients(gx, gw, x, w, t, tau, g, 2e-4)
    gx, gw = kce.linear_ce_backward(x, w, t, lse, g, CEParams(tau, -100, 16, "high"), True, True, blocks=SMALL,
                                    k_slices=2)
    check_gradients(gx, gw, x, w, t, tau, g, 2e-4)


def test_fused_forward_backward_computes_each_logits_tile_once():
    """Two products in all (three with dX): per row chunk one launch of the fused kernel (logits, logsumexp,
    coefficients) and the dW / dX products; neither the forward kernel nor the recomputing coefficient kernel."""
    from tools import kernel_aot as aot
    x, w, t, g = _ce_case(FUSED_SHAPES[0], torch.float32)
    with aot.recording(run=True) as launches:
        kce.linear_ce_forward_backward(x, w, t, g, CEParams(0.5, -100, 16, "high"), True, True, blocks=SMALL,
                                       k_slices=2)
    names = [kernel.fn.__name__ for kernel, _, _ in launches]
    chunks = -(-x.shape[0] // 16)
    assert names == ["_ce_fused_kernel", "_matmul_kernel", "_matmul_kernel"] * chunks, names


def test_fused_dw_is_bitwise_reproducible_and_split_path_within_its_bound():
    """bf16 features with an fp32 w (the bf16 pipeline's default path: w and the coefficients as bf16 halves) within
    the split's derived bound of float64; two runs give bitwise-identical dW (fixed partial slices, no atomics)."""
    n, d, num_classes = CE_SHAPE
    x = rand(n, d, dtype=torch.bfloat16, seed=7)
    w = rand(d, num_classes, seed=8, scale=0.3)
    t = labels(n, num_classes, seed=4, ignore=(3,))
    g = rand(n, seed=9).abs() * (t != -100)
    tau = 0.05
    runs = [kce.linear_ce_forward_backward(x, w, t, g, CEParams(tau, -100, 16, "high"), True, True, blocks=SMALL,
                                           k_slices=3)
            for _ in range(2)]
    loss, _, gx, gw = runs[0]
    assert_within_split_bound(loss, gx, gw, x, w, t, tau, g)
    assert torch.equal(runs[0][3], runs[1][3]) and torch.equal(runs[0][2], runs[1][2])


def test_streamed_w_is_padded_to_aligned_rows_only_when_needed():
    """The kernels stream w with rows of a multiple of 16 elements: a w whose C or row stride is not gets a
    zero-padded copy (the padding never reaches a result: the loss and gradient tests run such shapes)."""
    w = rand(19, 23, seed=1)
    padded = kce._aligned(w)
    assert padded.shape == (19, 32) and torch.equal(padded[:, :23], w) and torch.all(padded[:, 23:] == 0)
    aligned = rand(19, 32, seed=2)
    assert kce._aligned(aligned) is aligned
    assert kce._aligned(rand(32, 19, seed=3).T).stride() == (32, 1)       # transposed: copied
    assert kce._aligned(rand(19, 48, seed=4)[:, :32]).shape == (19, 32)   # row stride 48: aligned view kept
    assert kce.padded_width(1000) == 1008 and kce.padded_width(100) == 112 and kce.padded_width(16) == 16


def test_dw_slice_count_fills_the_sms_in_whole_waves(monkeypatch):
    """On a GPU (here an sm_90 one: 132 SMs) the dW slice count makes the product's programs
    (output tiles x slices) a whole number of waves where the limits allow: ImageNet-100 (6 tiles of 128 x 128) gets
    22 slices = 132 programs; ImageNet-1K's 48 tiles get 5 (240 programs: 91% of 2 waves) under the partials'
    memory budget (5 slices); a short chunk no more slices than it has BLOCK_K row steps."""
    mm = dict(tiles.MATMUL_LARGE)
    assert mm["BLOCK_M"] == mm["BLOCK_N"] == 128 and mm["BLOCK_K"] == 64
    monkeypatch.setattr(kce, "_sm_count", lambda device: 132)
    gpu = torch.device("meta")
    assert kce._num_k_slices(gpu, 768, 112, mm, 100_000) == 22
    assert kce._num_k_slices(gpu, 768, 1008, mm, 16_000) == 5
    assert kce._num_k_slices(gpu, 768, 112, mm, 100) == 2          # 2 row steps of 64
    assert kce._num_k_slices(torch.device("cpu"), 768, 1008, mm, 16_000) == 2   # the interpreter


def test_backend_forward_backward_has_the_agreed_signature():
    from clpdd_fast.kernels import backend as kbackend
    names = ["x", "w", "target", "grad_rows", "params", "need_x", "need_w"]
    assert list(inspect.signature(kbackend.linear_ce_forward_backward).parameters)[:len(names)] == names
    x, w, t, g = _ce_case(FUSED_SHAPES[1], torch.float64)
    loss, lse, gx, gw = kbackend.linear_ce_forward_backward(x, w, t, g, CEParams(0.3, -100, 8, "high"), True, True)
    loss_ex, lse_ex = reference.linear_ce_forward(x, w, t, CEParams(0.3, -100, 8, "high"))
    torch.testing.assert_close(lse, lse_ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, loss_ex, rtol=1e-12, atol=1e-12, equal_nan=True)
    gx_ex, gw_ex = reference.linear_ce_backward(x, w, t, lse_ex, g, CEParams(0.3, -100, 8, "high"), True, True)
    torch.testing.assert_close(gx, gx_ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ex, rtol=1e-12, atol=1e-12)


@gpu_only
def test_gpu_fused_forward_backward_at_imagenet_width():
    """Compiled (gpu_check.sh): the one-pass CE at d = 768, C = 1000 over several chunks, where the threads of a block
    write 16-bit coefficients over fp32 logits that other threads stored and read (the barriers the interpreter
    cannot test), in bf16, bf16 x + fp32 w (the pair) and fp16: losses as the forward kernel's, dW within what its
    coefficients' rounding allows of float64, bitwise identical on a second run, < 100 MiB beyond inputs and
    outputs."""
    n, d, num_classes = 20_011, 768, 1000
    t = labels(n, num_classes, ignore=(7,))
    g = torch.full((n,), 1.0 / n, device=DEVICE) * (t != -100)
    for x_dt, w_dt in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                       (torch.float16, torch.float16)):
        x = rand(n, d, dtype=x_dt, seed=1)
        w = rand(d, num_classes, dtype=w_dt, seed=2, scale=0.05)
        loss_f, lse_f = kce.linear_ce_forward(x, w, t, CEParams(0.1, -100, n, "high"))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, lse, _, gw = kce.linear_ce_forward_backward(x, w, t, g, CEParams(0.1, -100, n, "high"), False, True)
        outputs = 2 * loss.nbytes + gw.nbytes
        extra = torch.cuda.max_memory_allocated() - base - outputs
        assert extra < 100 * 2**20, f"{x_dt} x, {w_dt} w: {extra / 2**20:.1f} MiB beyond inputs and outputs"
        torch.testing.assert_close(loss, loss_f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, lse_f, rtol=1e-5, atol=1e-5)
        assert torch.equal(gw,
                           kce.linear_ce_forward_backward(x, w, t, g, CEParams(0.1, -100, n, "high"), False, True)[3])
        if w_dt == torch.float32:
            assert_within_split_bound(loss, None, gw, x, w, t, 0.1, g)
        elif x_dt == torch.float16:
            check_gradients(None, gw, x, w, t, 0.1, g, 1e-4)
        else:   # bf16 coefficients: 2^-9 relative per term, as test_kernel_backend's bf16 check allows
            _, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, CEParams(0.1, -100, 4096, "high"))
            gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, lse_ex, g.double(),
                                                 CEParams(0.1, -100, 4096, "high"), False, True)[1]
            assert (gw.double() - gw_ex).abs().max() <= 1e-2 * gw_ex.abs().max()


@pytest.mark.parametrize("need_x,need_w", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("chunk_size", [1000, 16, 5])
def test_linear_ce_backward_flags_and_chunking(need_x, need_w, chunk_size):
    n, d, num_classes = CE_SHAPE
    x, w, t = rand(n, d, seed=3), rand(d, num_classes, seed=4, scale=0.3), labels(n, num_classes, seed=2)
    _, lse = reference.linear_ce_forward(x, w, t, CEParams(0.7, -100, n, "high"))
    grad_rows = torch.full((n,), 1.0 / n, device=DEVICE)
    gx, gw = kce.linear_ce_backward(x, w, t, lse, grad_rows, CEParams(0.7, -100, chunk_size, "high"), need_x, need_w,
                                    blocks=SMALL, k_slices=3)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, lse, grad_rows, CEParams(0.7, -100, n, "high"), need_x,
                                                  need_w)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, lse.double(), grad_rows.double(),
                                                CEParams(0.7, -100, n, "high"), need_x, need_w)
    assert (gx is None) == (not need_x) and (gw is None) == (not need_w)
    if need_x:
        close_to_exact(gx, gx_ref, gx_ex, 2e-5)
    if need_w:
        close_to_exact(gw, gw_ref, gw_ex, 2e-5)


def test_linear_ce_default_tiles_mixed_dtypes_and_strided_inputs():
    n, d, num_classes = CE_SHAPE
    x = rand(d, n, dtype=torch.float16, seed=5).T                     # fp16 features, transposed view
    w = rand(d, num_classes, seed=6, scale=0.3)                         # fp32 weights: fp32 ieee path
    t = labels(n, num_classes, seed=3).int()
    loss, lse = kce.linear_ce_forward(x, w, t, CEParams(0.5, -100, 8, "high"))
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, CEParams(0.5, -100, 8, "high"))
    close_to_exact(loss, reference.linear_ce_forward(x, w, t, CEParams(0.5, -100, 8, "high"))[0], loss_ex, 1e-5)
    gx, gw = kce.linear_ce_backward(x, w, t, lse, torch.ones(n, device=DEVICE), CEParams(0.5, -100, 8, "high"), True,
                                    True)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, lse_ex,
                                                torch.ones(n, dtype=torch.float64, device=DEVICE), CEParams(0.5, -100,
                                                           8, "high"), True, True)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, lse, torch.ones(n, device=DEVICE),
                                                  CEParams(0.5, -100, 8, "high"), True, True)
    close_to_exact(gx, gx_ref, gx_ex, 1e-5)
    close_to_exact(gw, gw_ref, gw_ex, 1e-5)


@pytest.mark.parametrize("mode", ["high", "highest", "medium"])
def test_linear_ce_bf16_x_fp32_w_splits_w_into_bf16_halves(mode, monkeypatch):
    """bf16 features with an fp32 probe (the bf16 pipeline): under "high" w enters as hi + lo bf16 halves on tensor
    cores, within the split's derived error bound of float64; "highest" and "medium" keep fp32 operands."""
    calls = []
    real_split = kce.split_bf16
    monkeypatch.setattr(kce, "split_bf16", lambda t: calls.append(t.shape) or real_split(t))
    n, d, num_classes = CE_SHAPE
    x = rand(n, d, dtype=torch.bfloat16, seed=7)
    w = rand(d, num_classes, seed=8, scale=0.3)
    t = labels(n, num_classes, seed=4, ignore=(3,))
    g = rand(n, seed=9).abs() * (t != -100)
    tau = 0.05                                  # logits of ~100: the split's ~2^-17 relative error shows most here
    loss, lse = kce.linear_ce_forward(x, w, t, CEParams(tau, -100, 8, mode), blocks=SMALL)
    gx, gw = kce.linear_ce_backward(x, w, t, lse, g, CEParams(tau, -100, 8, mode), True, True, blocks=SMALL,
                                    k_slices=3)
    assert len(calls) == (2 if mode == "high" else 0)
    if mode == "high":
        assert_within_split_bound(loss, gx, gw, x, w, t, tau, g)
        return
    xd, wd = x.double(), w.double()
    loss_ex, lse_ex = reference.linear_ce_forward(xd, wd, t, CEParams(tau, -100, 8, "high"))
    gx_ex, gw_ex = reference.linear_ce_backward(xd, wd, t, lse_ex, g.double(), CEParams(tau, -100, 8, "high"), True,
                                                True)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, lse, g, CEParams(tau, -100, 8, "high"), True, True)
    tol = 1e-3 if mode == "medium" else 1e-5   # tf32 products are ~2^-11 relative (the interpreter ignores it)
    close_to_exact(loss, reference.linear_ce_forward(x, w, t, CEParams(tau, -100, 8, "high"))[0], loss_ex, tol)
    close_to_exact(gw, gw_ref, gw_ex, tol)
    close_to_exact(gx, gx_ref, gx_ex, tol)


def test_split_bf16_halves_reconstruct_fp32_and_bad_precision_raises():
    w = rand(19, 23, seed=3) * torch.logspace(-20, 20, 23, device=DEVICE)
    hi, lo = kce.split_bf16(w)
    assert torch.equal(hi.float(), w.to(torch.bfloat16).float())             # hi is w rounded to bf16
    assert torch.equal(lo.float(), lo.to(torch.bfloat16).float())            # lo is bf16 too
    rel = ((hi.double() + lo.double() - w.double()).abs() / w.double().abs()).max().item()
    assert 2.0**-18 < rel <= 2.0**-17                                         # the bound docs/KERNELS.md gives
    with pytest.raises(ValueError, match="precision: expected one of"):
        CEParams(1.0, -100, 8, "ieee")


def test_autotune_argument_and_explicit_blocks_keep_their_tiles():
    """autotune gives the launch the kernel's autotuner (one per kernel, kept) and no tiles, over tiles.CE_AUTOTUNE;
    explicit blocks, or no autotune, give the kernel itself with fixed tiles (tiles.CE; tiles.CE_FP64 for fp64)."""
    kernel = kce._ce_forward_kernel
    tuned, meta = kce._launchable(kernel, None, torch.float32, True)
    assert isinstance(tuned, triton.runtime.Autotuner) and tuned.fn is kernel and meta == {}
    assert len(tuned.configs) == len(tiles.CE_AUTOTUNE)
    assert kce._launchable(kernel, None, torch.float32, True)[0] is tuned
    defaults = {"num_warps": tiles.CE["num_warps"], "num_stages": tiles.CE["num_stages"]}
    assert kce._launchable(kernel, SMALL, torch.float32, True) == (kernel, {**SMALL, **defaults})
    assert kce._launchable(kernel, None, torch.float32, False) == (kernel, tiles.CE)
    assert kce._launchable(kernel, None, torch.float64, False) == (kernel, tiles.CE_FP64)


@triton.jit
def _round_to_bf16_probe(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    tl.store(dst_ptr + offs, kce._round_to_bf16(v), mask=offs < n)


def test_in_kernel_bf16_rounding_is_round_to_nearest_even_like_torch():
    v = rand(1000, seed=12) * torch.logspace(-30, 30, 1000, device=DEVICE)
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 2.0**-8 * 3], device=DEVICE)
    v = torch.cat([v, ties, torch.zeros(1, device=DEVICE)])
    out = torch.full_like(v, float("nan"))
    _round_to_bf16_probe[(triton.cdiv(v.numel(), 256),)](v, out, v.numel(), BLOCK=256)
    assert torch.equal(out, v.to(torch.bfloat16).float())


def test_linear_ce_backward_is_bitwise_reproducible():
    n, d, num_classes = CE_SHAPE
    x, w, t = rand(n, d, seed=7), rand(d, num_classes, seed=8), labels(n, num_classes, seed=4)
    _, lse = kce.linear_ce_forward(x, w, t, CEParams(1.0, -100, n, "high"), blocks=SMALL)
    g = torch.ones(n, device=DEVICE)
    first = kce.linear_ce_backward(x, w, t, lse, g, CEParams(1.0, -100, 16, "high"), True, True, blocks=SMALL)
    second = kce.linear_ce_backward(x, w, t, lse, g, CEParams(1.0, -100, 16, "high"), True, True, blocks=SMALL)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_linear_softmax_ce_triton_matches_torch(reduction):
    n, d, num_classes = CE_SHAPE
    results = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        x = rand(n, d, dtype=dtype, seed=1).requires_grad_()
        w = rand(d, num_classes, dtype=dtype, seed=2, scale=0.5).requires_grad_()
        t = labels(n, num_classes, ignore=(0, 5))
        loss = ops.linear_softmax_ce(x, w, t, tau=0.2, reduction=reduction, chunk_size=16, backend=backend)
        (loss.sum() if reduction == "none" else loss).backward()
        results[backend, dtype] = (loss.detach(), x.grad, w.grad)
    for fast, ref, exact in zip(results["triton", torch.float32], results["torch", torch.float32],
                                results["torch", torch.float64]):
        close_to_exact(fast, ref, exact, 1e-5)


def test_linear_ce_gradcheck_through_the_triton_backend():
    x = rand(7, 4, dtype=torch.float64, seed=33).requires_grad_()
    w = rand(4, 5, dtype=torch.float64, seed=34).requires_grad_()
    t = labels(7, 5, ignore=(2,))
    assert torch.autograd.gradcheck(lambda a, b: ops.linear_softmax_ce(a, b, t, 0.7, "mean", 3, backend="triton"),
                                    (x, w), fast_mode=True)


def test_strided_targets_are_read_at_their_stride():
    """A target view with a stride (every other label of a longer vector; an expanded one) gives the losses and
    gradients of its contiguous copy on all three launchers, which read targets at unit stride."""
    x, w, t, g = _ce_case(CE_SHAPE, torch.float64, seed=11)
    n, num_classes = x.shape[0], w.shape[1]
    spread = labels(2 * n, num_classes, seed=12)
    spread[::2] = t
    strided = spread[::2]
    assert strided.stride() == (2,) and torch.equal(strided, t)
    params = CEParams(0.5, -100, 16)
    for target in (strided, torch.tensor(2, device=DEVICE).expand(n)):
        dense = target.contiguous()
        loss, lse = kce.linear_ce_forward(x, w, target, params, blocks=SMALL)
        torch.testing.assert_close(loss, reference.linear_ce_forward(x, w, dense, params)[0], equal_nan=True)
        grads = kce.linear_ce_backward(x, w, target, lse, g, params, True, True, blocks=SMALL, k_slices=2)
        fused = kce.linear_ce_forward_backward(x, w, target, g, params, True, True, blocks=SMALL, k_slices=2)
        exact = reference.linear_ce_forward_backward(x, w, dense, g, params, True, True)
        torch.testing.assert_close(fused[0], exact[0], equal_nan=True)
        for got in (grads, fused[2:]):
            torch.testing.assert_close(got[0], exact[2])
            torch.testing.assert_close(got[1], exact[3])


def test_bf16_pair_low_coefficients_take_half_the_bytes_of_the_scratch(monkeypatch):
    """On a GPU (meta tensors) the fused pass of a bf16 x with a split fp32 w keeps the low halves of the
    coefficients in a compact bf16 buffer of the chunk's rows x C_pad (not an fp32-sized one), and the chunk's rows
    fit the scratch plus that buffer in CHUNK_BUDGET_BYTES."""
    from tools import kernel_aot as aot
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # recorded, not run: the recorder needs no interpreter
    n, d, num_classes = 50_000, 64, 1000
    meta = {"device": "meta"}
    x, w = torch.empty(n, d, dtype=torch.bfloat16, **meta), torch.empty(d, num_classes, **meta)
    t, g = torch.empty(n, dtype=torch.int64, **meta), torch.empty(n, **meta)
    with aot.recording() as launches:
        kce.linear_ce_forward_backward(x, w, t, g, CEParams(0.5, -100, n, "high"), False, True)
    fused = [args for kernel, args, _ in launches if kernel.fn.__name__ == "_ce_fused_kernel"]
    scratch, coef, coef_lo = fused[0][7], fused[0][8], fused[0][9]
    width = kce.padded_width(num_classes)
    assert scratch.dtype == torch.float32 and coef.dtype == coef_lo.dtype == torch.bfloat16
    assert coef_lo.shape == (scratch.shape[0], width) and coef_lo.stride() == (width, 1)
    assert coef.stride() == (2 * width, 1)                     # the highs in place over the fp32 logits
    rows = scratch.shape[0]
    assert rows * width * (4 + 2) <= kce.CHUNK_BUDGET_BYTES < (rows + 1) * width * (4 + 2)
