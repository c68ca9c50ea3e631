"""Every fixed tile configuration of the kernels, in one place: what the launchers use, and what the ahead-of-time
compile tool (tools/kernel_aot.py) and the benchmarks enumerate.

Each entry names the kernel module that launches it. Values that were measured are explained beside them
(benchmarks/RESULTS.md has the measurements); a change here is a change of compiled variants: run
`python tools/kernel_aot.py` (or `make test`, CLPDD_AOT_CHECK=1) to see its registers, spills and shared memory.
No Triton import: plain data.
"""
from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------- matmul.py
# The strided matmul's default tiles (Gram, glue products: m x d, d x C, small in this project).
MATMUL = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}
# Larger tiles for the long reductions of the CE backward (dW = x^T coef over many rows, dX = coef W^T): 16-bit
# coefficients, and fp32 ones (a narrower BLOCK_K keeps the FMA products' registers in bounds).
MATMUL_LARGE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
MATMUL_LARGE_FP32 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
# Resident blocks per SM of the dW matmul with MATMUL_LARGE (its registers: tools/kernel_report.py); the dW split
# into slices is sized to fill the SMs' resident blocks.
DW_BLOCKS_PER_SM = 1

# ----------------------------------------------------------------------------------------------- cholesky.py
# Block width of the factorisation and of the solves (rows of a diagonal block), RHS columns per solve program,
# warps and stages (with Triton's default 3 stages the fp64 factorisation step spilled registers on sm_90, triton 3.6).
CHOLESKY = {"BLOCK": 32, "BLOCK_RHS": 32, "num_warps": 4, "num_stages": 2}
# (block, warps) pairs `benchmarks/bench_ops.py --ops cholesky-tiles` compares to choose the defaults above (block 64
# is no candidate: its register tiles spill 0.5-6 KB per thread on sm_90, `python tools/kernel_aot.py --bench`).
CHOLESKY_CANDIDATES = [(block, warps) for block in (16, 32) for warps in (2, 4)]

# ----------------------------------------------------------------------------------------------- small_ridge.py
# Largest system the backend sends to the one-launch kernel (tests and benchmarks raise or lower it).
SMALL_RIDGE_MAX_SIZE = 64
# Largest system the kernel accepts, per compute dtype (register tiles of M x M, M = the padded size): at M = 128
# the register factorisation spills on sm_90 (the fp32 backward 72 bytes per thread with triton 3.6, fp64 0.3-1.2 KB
# with 8 warps and 0.2-0.6 KB with 16).
SMALL_RIDGE_LIMITS = {torch.float32: 64, torch.float64: 64}
# Inner dimension per tl.dot step (the smallest tl.dot allows: fewest registers per thread), right-hand-side columns
# (forward) / classes (backward) per output tile, rows of S^T X (forward) / feature columns of dphi (backward) per
# output tile, and no software pipelining (short loops; pipelining made ptxas spill a few registers).
SMALL_RIDGE = {"BLOCK_K": 16, "BLOCK_C": 32, "BLOCK_D": 32, "num_stages": 1}


def small_ridge_warps(size: int, dtype: torch.dtype) -> int:
    """Warps of the one program: 4, and 8 for fp64 tiles of 64 x 64 (the choices without a register spill on sm_90
    with triton 3.6 and 3.8; fp32 at 64 with 8 warps spilled a few bytes with 3.6)."""
    return 8 if size > 32 and dtype == torch.float64 else 4


# ----------------------------------------------------------------------------------------------- linear_ce.py
# Rows, classes and features per step of the forward, coefficient and fused kernels; the same sizes run on the
# interpreter (fewer numpy steps).
CE = {"BLOCK_ROWS": 64, "BLOCK_CLASSES": 128, "BLOCK_FEATURES": 64, "num_warps": 8, "num_stages": 3}
# The fused kernel's BLOCK_FEATURES for exact fp32 (CUDA-core) products: no spill.
CE_FUSED_FEATURES_FMA = 32
# fp64 tiles take twice the shared memory: smaller tiles, fewer stages.
CE_FP64 = {"BLOCK_ROWS": 32, "BLOCK_CLASSES": 64, "BLOCK_FEATURES": 32, "num_warps": 4, "num_stages": 2}
# What the forward and coefficient kernels autotune over (CEParams.autotune; the fused kernel keeps CE).
CE_AUTOTUNE = [{"BLOCK_ROWS": rows, "BLOCK_CLASSES": classes, "BLOCK_FEATURES": features, "num_warps": w,
                "num_stages": s}
               for rows, classes, features, w, s in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                                                     (128, 64, 32, 4, 4), (64, 256, 32, 8, 3)]]
