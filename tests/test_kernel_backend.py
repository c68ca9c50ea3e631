"""kernels/backend.py (the six backend functions on the kernels) against clpdd_fast.reference and float64, through
the fused small-system path and the blocked one, and the public ops with backend="triton"; under Triton's interpreter
on CPU tensors without CUDA (tests/conftest.py sets TRITON_INTERPRET=1), compiled with CUDA, plus the GPU-only tests
(bf16, large shapes, bitwise determinism, memory).
"""
import contextlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

from helpers import CUDA, DEVICE, check_kernels_can_run, close_to_exact, gpu_only, labels, rand, spd, tol_for

check_kernels_can_run()

import triton  # noqa: E402

from ce_split_bound import assert_within_split_bound  # noqa: E402
from clpdd_fast import custom_ops, ops, reference, settings  # noqa: E402
from clpdd_fast.kernels import backend as kbackend  # noqa: E402
from clpdd_fast.kernels import cholesky as kchol  # noqa: E402
from clpdd_fast.kernels import matmul as kmatmul  # noqa: E402
from clpdd_fast.kernels import small_ridge as ksmall  # noqa: E402
from clpdd_fast.kernels import tiles  # noqa: E402
from clpdd_fast.kernels.contract import CEParams  # noqa: E402
from clpdd_fast.validation import NotPositiveDefiniteError  # noqa: E402
from tools import kernel_aot as kaot  # noqa: E402


def test_backend_exposes_the_reference_functions_with_the_same_signatures():
    for name in ("gram", "ridge_forward", "ridge_backward", "linear_ce_forward", "linear_ce_backward",
                 "linear_ce_forward_backward"):
        ours = list(inspect.signature(getattr(kbackend, name)).parameters.values())
        theirs = list(inspect.signature(getattr(reference, name)).parameters)
        # the same parameters, in order; the launchers' own extras (tile overrides for tests) come after, optional
        assert [p.name for p in ours[:len(theirs)]] == theirs, name
        assert all(p.default is not inspect.Parameter.empty for p in ours[len(theirs):]), name


def test_kernels_run_under_the_interpreter_on_cpu():
    if not CUDA:
        assert type(kmatmul._matmul_kernel).__name__.startswith("Interpreted")
    assert custom_ops.resolve_backend("triton", torch.device(DEVICE)) is kbackend


@pytest.fixture(params=["fused", "blocked"])
def ridge_path(request, monkeypatch):
    """Run a ridge test through the one-launch small-system kernel and through the blocked Cholesky path."""
    monkeypatch.setattr(tiles, "SMALL_RIDGE_MAX_SIZE",
                        max(tiles.SMALL_RIDGE_LIMITS.values()) if request.param == "fused" else 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_sends_a_system_above_the_dtype_limit_to_the_blocked_path(dtype, monkeypatch):
    """With SMALL_RIDGE_MAX_SIZE above the kernel's limit for this dtype, a system at the limit still takes the
    one-launch kernel and one past it the blocked path; both match float64."""
    monkeypatch.setattr(tiles, "SMALL_RIDGE_MAX_SIZE", 10 * ksmall.size_limit(dtype))
    calls = []
    for name in ("small_ridge_solve", "small_ridge_backward"):
        real = getattr(ksmall, name)
        monkeypatch.setattr(ksmall, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    for n, fused in ((ksmall.size_limit(dtype), True), (ksmall.size_limit(dtype) + 3, False)):
        calls.clear()
        phi, y, g = rand(n, 9, dtype=dtype, seed=1), rand(n, 3, dtype=dtype, seed=2), rand(9, 3, dtype=dtype, seed=3)
        w, factor, info = kbackend.ridge_forward(phi, y, 0.5, "dual")
        gp, gy = kbackend.ridge_backward(phi, y, w, factor, g, "dual", True, True)
        assert int(info) == 0 and calls == (["small_ridge_solve", "small_ridge_backward"] if fused else [])
        w_ex, factor_ex, _ = reference.ridge_forward(phi.double(), y.double(), 0.5, "dual")
        gp_ex, gy_ex = reference.ridge_backward(phi.double(), y.double(), w_ex, factor_ex, g.double(), "dual",
                                                True, True)
        w_ref, factor_ref, _ = reference.ridge_forward(phi, y, 0.5, "dual")
        gp_ref, gy_ref = reference.ridge_backward(phi, y, w_ref, factor_ref, g, "dual", True, True)
        for fast, ref, exact in ((w, w_ref, w_ex), (gp, gp_ref, gp_ex), (gy, gy_ref, gy_ex)):
            close_to_exact(fast, ref, exact, tol_for(dtype) * 10)


RIDGE_CASES = [(29, 19, 7, "primal"), (29, 19, 7, "dual"), (13, 37, 5, "dual"), (13, 37, 5, "primal")]


@pytest.mark.parametrize("m,d,num_classes,mode", RIDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.3, 1e3])
def test_ridge_forward_backward_match_reference_and_float64(ridge_path, m, d, num_classes, mode, dtype, lam):
    phi = rand(m, d, dtype=dtype, seed=m)
    y = rand(m, num_classes, dtype=dtype, seed=d)
    w, factor, info = kbackend.ridge_forward(phi, y, lam, mode)
    assert int(info) == 0
    w_ref, factor_ref, _ = reference.ridge_forward(phi, y, lam, mode)
    w_ex, factor_ex, _ = reference.ridge_forward(phi.double(), y.double(), lam, mode)
    tol = tol_for(dtype) * 10
    close_to_exact(w, w_ref, w_ex, tol)
    close_to_exact(factor, factor_ref, factor_ex, tol)
    g = rand(d, num_classes, dtype=dtype, seed=11)
    gp, gy = kbackend.ridge_backward(phi, y, w, factor, g, mode, True, True)
    gp_ref, gy_ref = reference.ridge_backward(phi, y, w_ref, factor_ref, g, mode, True, True)
    gp_ex, gy_ex = reference.ridge_backward(phi.double(), y.double(), w_ex, factor_ex, g.double(), mode, True, True)
    close_to_exact(gp, gp_ref, gp_ex, tol)
    close_to_exact(gy, gy_ref, gy_ex, tol)
    assert kbackend.ridge_backward(phi, y, w, factor, g, mode, False, False) == (None, None)


def test_ridge_low_precision_inputs_and_tiny_lam(ridge_path):
    phi = rand(13, 37, dtype=torch.float16, seed=4)
    y = rand(13, 5, dtype=torch.float16, seed=5)
    w, factor, info = kbackend.ridge_forward(phi, y, 1e-6, "dual")
    assert int(info) == 0 and w.dtype == torch.float32
    w_ref, _, _ = reference.ridge_forward(phi, y, 1e-6, "dual")
    w_ex, _, _ = reference.ridge_forward(phi.double(), y.double(), 1e-6, "dual")
    close_to_exact(w, w_ref, w_ex, 1e-4)


@pytest.mark.parametrize("mode", ["dual", "primal"])
def test_public_ridge_solve_and_gram_triton_match_torch(ridge_path, mode):
    results = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        phi = rand(29, 19, dtype=dtype, seed=2).requires_grad_()
        y = rand(29, 7, dtype=dtype, seed=3).requires_grad_()
        w = ops.ridge_solve(phi, y, 0.7, mode, backend=backend)
        k = ops.gram(phi, 0.1, backend=backend)
        ((w * rand(19, 7, dtype=dtype, seed=4)).sum() + (k * k).sum() * 1e-3).backward()
        results[backend, dtype] = (w.detach(), k.detach(), phi.grad, y.grad)
    for fast, ref, exact in zip(results["triton", torch.float32], results["torch", torch.float32],
                                results["torch", torch.float64]):
        close_to_exact(fast, ref, exact, 1e-5)


@pytest.mark.parametrize("real_dtype", [torch.float32, torch.bfloat16])   # bf16: the --precision bf16 pipeline
def test_public_clpdd_loss_triton_matches_torch(ridge_path, real_dtype):
    out = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        phi_s = rand(10, 19, dtype=dtype, seed=1).requires_grad_()
        y_s = torch.arange(10, device=DEVICE) % 5
        # real features rounded to real_dtype first, so that every backend sees the same values
        phi_r, y_r = rand(37, 19, dtype=real_dtype, seed=2), labels(37, 5)
        phi_r = phi_r if dtype == torch.float32 else phi_r.to(dtype)
        loss = ops.clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.3, tau=0.05, num_classes=5, backend=backend)
        loss.backward()
        out[backend, dtype] = (loss.detach(), phi_s.grad)
    for fast, ref, exact in zip(out["triton", torch.float32], out["torch", torch.float32],
                                out["torch", torch.float64]):
        close_to_exact(fast, ref, exact, 1e-5)


@pytest.mark.parametrize("mode", ["dual", "primal"])
def test_ridge_gradcheck_through_the_triton_backend(ridge_path, mode):
    """Finite differences against the kernels' own backward (fp64), not only against the torch backward
    (fast_mode: random directional derivatives, a few interpreted launches instead of one per input)."""
    phi = rand(5, 4, dtype=torch.float64, seed=31).requires_grad_()
    y = rand(5, 3, dtype=torch.float64, seed=32).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: ops.ridge_solve(p, t, 0.45, mode, backend="triton"), (phi, y),
                                    fast_mode=True)


def _ridge_launches(dtype, mode, precision):
    """(kernel name, PRECISION) of every launch of gram and of the blocked ridge path, forward and backward, with
    the backend's precision argument (None: its default); the results are checked against float64 too."""
    phi, y, g = rand(37, 19, dtype=dtype, seed=5), rand(37, 4, dtype=dtype, seed=6), rand(19, 4, dtype=dtype, seed=7)
    extra = () if precision is None else (precision,)
    with kaot.recording(run=True) as launches:
        k = kbackend.gram(phi, 0.5, *extra)
        w, factor, info = kbackend.ridge_forward(phi, y, 0.5, mode, *extra)
        gp, _ = kbackend.ridge_backward(phi, y, w, factor, g, mode, True, True, *extra)
    w_ex, factor_ex, _ = reference.ridge_forward(phi.double(), y.double(), 0.5, mode)
    gp_ex, _ = reference.ridge_backward(phi.double(), y.double(), w_ex, factor_ex, g.double(), mode, True, False)
    w_ref, factor_ref, _ = reference.ridge_forward(phi, y, 0.5, mode)
    gp_ref, _ = reference.ridge_backward(phi, y, w_ref, factor_ref, g, mode, True, False)
    assert int(info) == 0
    for fast, ref, exact in ((k, reference.gram(phi, 0.5), reference.gram(phi.double(), 0.5)), (w, w_ref, w_ex),
                             (gp, gp_ref, gp_ex)):
        close_to_exact(fast, ref, exact, tol_for(dtype) * 10)
    return [(kernel.fn.__name__, kwargs.get("PRECISION")) for kernel, _, kwargs in launches]


@pytest.mark.parametrize("mode", ["dual", "primal"])
@pytest.mark.parametrize("dtype,precision,expected", [(torch.float32, "high", "tf32x3"),
                                                      (torch.float32, None, "ieee"),
                                                      (torch.float64, "high", "ieee")],
                         ids=["fp32-high", "fp32-default", "fp64-high"])
def test_ridge_precision_reaches_every_product_of_gram_and_the_blocked_path(dtype, precision, expected, mode,
                                                                            monkeypatch):
    """The ridge precision ("high": tf32x3) is the input_precision of every tl.dot launch of gram, the blocked
    Cholesky, the solves and the backward products for fp32 (fp64 stays exact). The interpreter ignores
    input_precision: the arithmetic of tf32x3 is checked by emulation (tests/test_precision_study.py), its code by the
    sm_90 compile below, and on a GPU by test_gpu_ridge_tf32x3_matches_float64_where_tf32_fails."""
    monkeypatch.setattr(tiles, "SMALL_RIDGE_MAX_SIZE", 0)
    launches = _ridge_launches(dtype, mode, precision)
    names = {name for name, _ in launches}
    assert {"_matmul_kernel", "_cholesky_step_kernel", "_cholesky_solve_kernel"} <= names
    assert {name for name, prec in launches if prec is not None} == {"_matmul_kernel", "_cholesky_step_kernel",
                                                                      "_cholesky_solve_kernel"}
    assert {prec for _, prec in launches if prec is not None} == {expected}, launches


def test_small_ridge_systems_stay_exact_under_tf32x3():
    """The one-launch kernel of small systems has no precision argument: its products stay exact fp32."""
    launches = _ridge_launches(torch.float32, "dual", "high")
    assert {name for name, _ in launches} == {"_matmul_kernel", "_mirror_diagonal_tiles_kernel",
                                              "_small_ridge_kernel", "_small_ridge_backward_kernel"}
    assert {prec for name, prec in launches if name == "_matmul_kernel"} == {"tf32x3"}   # the public gram


@pytest.mark.parametrize("value,expected",
                         [("high", "tf32x3"), ("highest", "ieee"), ("tf32x3", "tf32x3"), ("", "ieee")],
                         ids=["high", "highest", "old-word", "unset"])
def test_ridge_precision_setting_reaches_the_kernels_through_the_ops(value, expected, monkeypatch):
    """CLPDD_RIDGE_PRECISION, read by the ops once per call, is the input_precision of the blocked path's products
    forward and backward (an old word, with a note, too)."""
    monkeypatch.setattr(tiles, "SMALL_RIDGE_MAX_SIZE", 0)
    phi = rand(37, 19, seed=5).requires_grad_()
    noted = pytest.warns(FutureWarning, match="is now called") if value == "tf32x3" else contextlib.nullcontext()
    with noted, settings.overridden("CLPDD_RIDGE_PRECISION", value), kaot.recording(run=True) as launches:
        ops.ridge_solve(phi, rand(37, 4, seed=6), 0.5, "dual", backend="triton").sum().backward()
    names = {kernel.fn.__name__ for kernel, _, kwargs in launches if "PRECISION" in kwargs}
    assert {"_matmul_kernel", "_cholesky_step_kernel", "_cholesky_solve_kernel"} <= names
    assert {kwargs["PRECISION"] for _, _, kwargs in launches if "PRECISION" in kwargs} == {expected}


def test_ridge_precision_rejects_plain_tf32_in_the_cholesky():
    with pytest.raises(ValueError, match="input_precision: expected one of"):
        kchol.cholesky(spd(5, torch.float32), input_precision="tf32")
    with pytest.raises(ValueError, match="matmul: input_precision must be one of"):
        kmatmul.matmul(rand(3, 4), rand(4, 2), input_precision="tf32x6")
    with pytest.raises(ValueError, match="precision: expected one of"):
        kbackend.gram(rand(3, 4), 0.0, "medium")


@gpu_only
@pytest.mark.parametrize("mode", ["dual", "primal"])
def test_gpu_ridge_tf32x3_matches_float64_with_small_lam(mode):
    """The hardware's tf32x3 on an ill-conditioned ridge system of m > d unit-norm features (lam 1e-4: emulated
    plain TF32 fails the factorisation, benchmarks/precision_study.py): within the ridge tests' tolerance of float64,
    like exact fp32 products."""
    phi = torch.nn.functional.normalize(rand(600, 100, seed=41) + rand(1, 100, seed=42), dim=1)
    y = torch.nn.functional.one_hot(torch.arange(600, device=DEVICE) % 10, 10).float()
    g = rand(100, 10, seed=43)
    w_ex, f_ex, _ = reference.ridge_forward(phi.double(), y.double(), 1e-4, mode)
    gp_ex, _ = reference.ridge_backward(phi.double(), y.double(), w_ex, f_ex, g.double(), mode, True, False)
    w_ref, f_ref, _ = reference.ridge_forward(phi, y, 1e-4, mode)
    gp_ref, _ = reference.ridge_backward(phi, y, w_ref, f_ref, g, mode, True, False)
    for precision in ("highest", "high"):
        w, factor, info = kbackend.ridge_forward(phi, y, 1e-4, mode, precision)
        gp, _ = kbackend.ridge_backward(phi, y, w, factor, g, mode, True, False, precision)
        assert int(info) == 0, precision
        close_to_exact(w, w_ref, w_ex, tol_for(torch.float32) * 10)
        close_to_exact(gp, gp_ref, gp_ex, tol_for(torch.float32) * 10)


TF32_PTX_SCRIPT = r"""
import re, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from clpdd_fast.kernels import backend, tiles
from tools import kernel_aot as aot
tiles.SMALL_RIDGE_MAX_SIZE = 0
for precision, word in (("ieee", "highest"), ("tf32x3", "high")):
    with aot.recording() as launches:
        phi, y = torch.empty(100, 40, device="meta"), torch.empty(100, 7, device="meta")
        backend.ridge_forward(phi, y, 0.5, "dual", word)
    for v in aot.variants(launches, 90):
        if "PRECISION" in v.flags:
            ptx = triton.compile(ASTSource(v.kernel, v.signature, v.constexprs, v.attrs),
                                 target=GPUTarget("cuda", 90, 32), options=v.options.__dict__).asm["ptx"]
            print(precision, v.kernel.fn.__name__, len(re.findall(r"cvt\.rna\.tf32\.f32", ptx)),
                  len(re.findall(r"mma\S*\.tf32", ptx)))
"""


@pytest.mark.skipif(os.environ.get("CLPDD_AOT_CHECK") != "1", reason="set CLPDD_AOT_CHECK=1: compiles kernels for "
                    "sm_90 without a GPU")
def test_tf32x3_compiles_to_tf32_tensor_core_products_for_hopper():
    """The PTX of every kernel with a PRECISION argument: with tf32x3, TF32 conversions (cvt.rna, Triton's split) and
    TF32 tensor-core instructions; with ieee, neither."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TF32_PTX_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    kernels = {"_matmul_kernel", "_cholesky_step_kernel", "_cholesky_solve_kernel"}
    for precision in ("ieee", "tf32x3"):
        assert {r[1] for r in rows if r[0] == precision} == kernels, proc.stdout
    for precision, name, cvt, mma in rows:
        assert (int(cvt) > 0 and int(mma) > 0) if precision == "tf32x3" else (int(cvt) == 0 and int(mma) == 0), rows


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
def test_public_ridge_solve_raises_not_positive_definite_on_overflowing_features(ridge_path):
    phi = torch.full((6, 5), 1e20, device=DEVICE)        # the Gram matrix overflows: inf / NaN pivots
    y = rand(6, 3)
    for backend in ("torch", "triton"):
        with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
            ops.ridge_solve(phi, y, 1e-3, "dual", backend=backend)


def test_triton_path_never_calls_torch_linalg_or_cross_entropy(ridge_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path called a torch routine it replaces")
    for owner, name in [(torch.linalg, "cholesky"), (torch.linalg, "cholesky_ex"), (torch, "cholesky_solve"),
                        (torch.linalg, "solve_triangular"), (torch.linalg, "solve"), (torch.linalg, "inv"),
                        (torch, "logsumexp"), (torch.Tensor, "logsumexp"), (torch, "cholesky"),
                        (torch.nn.functional, "cross_entropy"), (torch.nn.functional, "log_softmax"),
                        (torch.nn.functional, "softmax"), (torch, "log_softmax"), (torch, "softmax")]:
        monkeypatch.setattr(owner, name, boom)
    phi_s = rand(10, 19, seed=1).requires_grad_()
    y_s = torch.arange(10, device=DEVICE) % 5
    phi_r, y_r = rand(37, 19, seed=2), labels(37, 5)
    loss = ops.clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.3, tau=0.5, num_classes=5, backend="triton")
    loss.backward()
    k = ops.gram(phi_s, 0.1, backend="triton")
    assert torch.isfinite(loss) and torch.isfinite(phi_s.grad).all() and torch.isfinite(k).all()
    with pytest.raises(AssertionError, match="replaces"):
        ops.clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.3, num_classes=5, backend="torch")


@gpu_only
def test_gpu_bf16_linear_ce_and_ridge():
    n, d, num_classes = 4099, 768, 1000
    x = rand(n, d, dtype=torch.bfloat16, seed=1)
    w = rand(d, num_classes, dtype=torch.bfloat16, seed=2, scale=0.05)
    t = labels(n, num_classes, ignore=(7,))
    loss, lse = kbackend.linear_ce_forward(x, w, t, CEParams(0.1, -100, 4096, "high"))
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, CEParams(0.1, -100, 4096, "high"))
    torch.testing.assert_close(loss.double(), loss_ex, rtol=1e-4, atol=1e-3)
    g = torch.full((n,), 1.0 / n, device=DEVICE) * (t != -100)
    gx, gw = kbackend.linear_ce_backward(x, w, t, lse, g, CEParams(0.1, -100, 4096, "high"), True, True)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, lse_ex, g.double(),
                                                CEParams(0.1, -100, 4096, "high"), True, True)
    # bf16 coefficients: ~2^-9 relative per term (replayed in float64 with this data: 0.2 of these tolerances; a
    # truncating tensor-core adder, modelled, uses 0.01 of the loss tolerance above)
    assert (gw.double() - gw_ex).abs().max() <= 1e-2 * gw_ex.abs().max()
    assert (gx.double() - gx_ex).abs().max() <= 1e-2 * gx_ex.abs().max()
    # bf16 x with an fp32 w: w split into bf16 halves (2^-17 relative), within the split's derived bound. With
    # this data the float64 replay of the split uses at most 0.72 of the split part (dX; 0.04 loss, 0.02 dW: exact
    # arithmetic, so no chance involved); the whole path run by the interpreter on the CPU 0.21 of the kernel part
    # (0.007 loss); a model of a truncating tensor-core adder without guard bits 0.15 (loss), 0.09 (dX).
    w32 = rand(d, num_classes, seed=2, scale=0.05)
    loss, lse = kbackend.linear_ce_forward(x, w32, t, CEParams(0.1, -100, 4096, "high"))
    gx, gw = kbackend.linear_ce_backward(x, w32, t, lse, g, CEParams(0.1, -100, 4096, "high"), True, True)
    assert_within_split_bound(loss, gx, gw, x, w32, t, 0.1, g)
    phi = rand(1000, 768, dtype=torch.bfloat16, seed=3)
    y = torch.nn.functional.one_hot(torch.arange(1000, device=DEVICE) % 100, 100).to(torch.bfloat16)
    for mode in ("dual", "primal"):
        w_t, _, info = kbackend.ridge_forward(phi, y, 10.0, mode)
        w_ex, _, _ = reference.ridge_forward(phi.double(), y.double(), 10.0, mode)
        assert int(info) == 0
        assert (w_t.double() - w_ex).abs().max() <= 1e-3 * w_ex.abs().max()


@gpu_only
def test_gpu_large_shapes_bitwise_determinism_and_memory():
    n, d, num_classes = 200_003, 768, 1000
    x = rand(n, d, dtype=torch.bfloat16, seed=4)
    t = labels(n, num_classes)
    g = torch.full((n,), 1.0 / n, device=DEVICE)
    for w_dtype in (torch.bfloat16, torch.float32):   # bf16 pair, and bf16 x with fp32 w (split into halves)
        w = rand(d, num_classes, dtype=w_dtype, seed=5, scale=0.05)
        loss, lse = kbackend.linear_ce_forward(x, w, t, CEParams(0.1, -100, 16384, "high"))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _, gw1 = kbackend.linear_ce_backward(x, w, t, lse, g, CEParams(0.1, -100, 16384, "high"), False, True)
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < 100 * 2**20, f"backward ({w_dtype}) used {extra / 2**20:.1f} MiB beyond its inputs"
        _, gw2 = kbackend.linear_ce_backward(x, w, t, lse, g, CEParams(0.1, -100, 16384, "high"), False, True)
        assert torch.equal(gw1, gw2), f"two runs must give bitwise-identical dW ({w_dtype})"
        if w_dtype == torch.float32:   # the split's derived bound (float64 row blocks of ~3 GB); the fp32 torch
            # comparison it replaces had no derivation: a float64 replay of the split alone used 0.38 of rtol=atol=1e-4
            for s in range(0, n, 50_000):
                assert_within_split_bound(loss[s:s + 50_000], None, None, x[s:s + 50_000], w, t[s:s + 50_000], 0.1)
        else:
            loss_ref, _ = reference.linear_ce_forward(x, w, t, CEParams(0.1, -100, 16384, "high"))
            torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    a = spd(1000, torch.float32, seed=6)
    f1, _ = kchol.cholesky(a)
    f2, _ = kchol.cholesky(a)
    assert torch.equal(f1, f2)


@gpu_only
def test_gpu_int64_row_offsets_beyond_2_pow_31_elements():
    d, num_classes = 768, 16
    n = (2**31) // d + 4099                                # n * d > 2^31: int32 offsets would wrap
    try:
        x = torch.empty((n, d), dtype=torch.bfloat16, device=DEVICE)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[: n - 64].zero_()
    x[n - 64:] = rand(64, d, dtype=torch.bfloat16, seed=1)
    w = rand(d, num_classes, dtype=torch.bfloat16, seed=2, scale=0.1)
    t = labels(n, num_classes)
    loss, _ = kbackend.linear_ce_forward(x, w, t, CEParams(1.0, -100, 1 << 20, "high"))
    tail, _ = reference.linear_ce_forward(x[n - 64:], w, t[n - 64:], CEParams(1.0, -100, 64, "high"))
    torch.testing.assert_close(loss[n - 64:], tail, rtol=1e-4, atol=1e-4)


def test_triton_version_is_recent_enough():
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    assert (major, minor) >= (3, 0)


# ----------------------------------------------------------------------------------------------- the custom-op layer
def test_opcheck_and_fullgraph_compile_on_the_triton_backend():
    """The `clpdd` custom ops with backend="triton": opcheck passes, and torch.compile(fullgraph=True) of a function
    calling every op gives the eager result (compiled kernels on a GPU, the interpreter on the CPU)."""
    torch._dynamo.reset()
    phi_s, phi_r = rand(7, 5, seed=90, requires_grad=True), rand(19, 5, seed=91, requires_grad=True)
    y_s, y_r = torch.arange(7, device=DEVICE) % 3, labels(19, 3, seed=92)
    c = torch.ops.clpdd
    for op, args in [(c.gram.default, (phi_s, 0.1, "triton", True, "x")),
                     (c.ridge_factorize.default, (phi_s, rand(7, 3, seed=93), 0.5, "dual", "triton", True, "phi,y")),
                     (c.linear_ce_rows.default, (phi_r, rand(5, 3, seed=94), y_r, 0.5, -100, 8, "triton", "high", True,
                                                 "x,w,target"))]:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)

    def user(a, b):
        return ops.gram(a, 0.1, backend="triton").square().mean() + \
            ops.clpdd_loss(a, y_s, b, y_r, 0.5, 0.4, num_classes=3, backend="triton")

    eager = user(phi_s, phi_r)
    grads = torch.autograd.grad(eager, (phi_s, phi_r))
    # aot_eager: dynamo and AOT autograd trace the ops (a graph break fails), without inductor's code generation,
    # which would cost gpu_check's time budget nothing here can pay back (the kernels are opaque to it anyway)
    got = torch.compile(user, fullgraph=True, backend="aot_eager")(phi_s, phi_r)
    got_grads = torch.autograd.grad(got, (phi_s, phi_r))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@gpu_only
def test_gpu_no_host_synchronisation_without_check_finite():
    """With check_finite=False a CLP-DD loss and its backward make no device-to-host synchronisation (torch's sync
    debug mode turns one into an error)."""
    phi_s = rand(40, 64, seed=95, requires_grad=True)
    phi_r, y_r = rand(3000, 64, seed=96, dtype=torch.bfloat16), labels(3000, 10, seed=97)
    y_s = torch.arange(40, device=DEVICE) % 10
    for mode in ("dual", "primal"):   # warm-up: compile the kernels first
        ops.clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, 0.1, mode=mode, num_classes=10, check_finite=False).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("dual", "primal"):
            ops.clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, 0.1, mode=mode, num_classes=10, check_finite=False).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_second_gpu_run_there():
    """Every launch runs on its tensors' device, whatever the current device is."""
    phi_s = rand(9, 6, seed=98, device="cuda:1", requires_grad=True)
    phi_r, y_r = rand(50, 6, seed=99, device="cuda:1"), labels(50, 3, seed=100, device="cuda:1")
    with torch.cuda.device(0):
        loss = ops.clpdd_loss(phi_s, torch.arange(9, device="cuda:1") % 3, phi_r, y_r, 0.5, num_classes=3)
        loss.backward()
    expect = ops.clpdd_loss(phi_s.detach().cpu().double(), torch.arange(9) % 3, phi_r.cpu().double(), y_r.cpu(), 0.5,
                            num_classes=3)
    assert loss.device == torch.device("cuda:1") and phi_s.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(loss.double().cpu(), expect, rtol=1e-5, atol=1e-6)
