"""Helpers shared by the test modules: seeded random inputs, comparisons against float64 that name the worst element,
the device the kernel tests run on, and the tiny encoder and command line of the pipeline tests. Test modules import
them with `from helpers import ...` (pytest puts tests/ on sys.path: the folder has no __init__.py)."""
import pytest
import torch

from clpdd_fast import settings

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"   # the kernel tests' device: compiled on a GPU, else Triton's interpreter on the CPU
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton); gpu_check.sh runs it")


def check_kernels_can_run() -> None:
    """Without CUDA the kernel tests need Triton's interpreter, which triton reads when kernels are decorated, i.e. at
    import: call this before importing triton (tests/conftest.py sets TRITON_INTERPRET=1 first)."""
    if not CUDA and not settings.triton_interpret():
        raise RuntimeError("without CUDA the kernel tests need TRITON_INTERPRET=1 before triton is imported "
                           "(tests/conftest.py sets it: run them through pytest from the repository)")


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0, device=DEVICE, requires_grad=False):
    """Standard normal values times `scale`, drawn in float64 from a generator seeded with `seed` and then rounded to
    `dtype`: one seed gives the same values, up to rounding, in every dtype."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def labels(n, num_classes, seed=0, ignore=(), device=DEVICE):
    """n class indices in [0, num_classes), seeded; the rows in `ignore` get -100 (the ignore_index)."""
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, num_classes, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    return t.to(device)


def spd(n, dtype, seed=0, lam=0.1):
    """A random symmetric positive definite (n, n) matrix x x^T + lam I (x of n + 5 columns), built in float64."""
    x = rand(n, n + 5, dtype=torch.float64, seed=seed)
    return (x @ x.T + lam * torch.eye(n, dtype=torch.float64, device=DEVICE)).to(dtype)


def tol_for(dtype):
    """The relative tolerance of a result computed in dtype's compute precision (fp64, else fp32)."""
    return 1e-12 if dtype == torch.float64 else 2e-5


def worst_element(got, expected, errors, allowed=None) -> str:
    """'at (i, j): got ..., expected ... (float64)' for the element where `errors` (same shape) is largest, with the
    error `allowed` there when given (a tensor of that shape)."""
    index = tuple(int(i) for i in torch.unravel_index(errors.argmax(), errors.shape))
    text = f"at {index}: got {got[index].item():.10g}, expected {expected[index].item():.10g} (float64)"
    return text if allowed is None else f"{text}, allowed error {allowed[index].item():.3g}"


def close_to_exact(fast, ref, exact, tol):
    """|fast - exact| <= 2 |torch in the same precision - exact| + tol * max|exact| (elementwise maxima): `fast` at
    most twice as far from the exact (float64) values as torch's own result `ref`, plus `tol` relative to the largest
    exact value (at least 1). A failure names the worst element."""
    assert fast.shape == exact.shape, (fast.shape, exact.shape)
    assert torch.isfinite(fast).all(), "non-finite entries (unwritten output?)"
    exact = exact.double().cpu()
    errors = (fast.double().cpu() - exact).abs()
    err_fast = errors.max().item()
    err_ref = (ref.double().cpu() - exact).abs().max().item()
    scale = max(exact.abs().max().item(), 1.0)
    bound = 2 * err_ref + tol * scale
    assert err_fast <= bound, (f"max error {err_fast:.3g} {worst_element(fast, exact, errors)}; bound {bound:.3g} = "
                               f"2 x torch error {err_ref:.3g} + tol {tol:g} x {scale:.3g}")


TINY_MODEL = "test_efficientnet"  # a tiny timm model (random weights): the encoder of the pipeline tests


def run_args(data, out, cache, *extra):
    """A distill command line on `data` with the tiny encoder at 32 px on the CPU, writing to `out`."""
    return ["--data", str(data), "--model", TINY_MODEL, "--weights", "none", "--image-size", "32",
            "--out", str(out), "--cache-dir", str(cache), "--device", "cpu", "--log-every", "1", *extra]
