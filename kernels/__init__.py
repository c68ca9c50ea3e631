"""Triton kernels for clpdd_fast (no autograd, no I/O); installed as `clpdd_fast.kernels` (see setup.py).

    gram.py       strided matmul kernel (split-K into fixed partial slices, accumulate, symmetric lower-tile mode)
                  and the Gram matrix x x^T + lam I built on it
    cholesky.py   blocked left-looking Cholesky (LAPACK-style info) and the many-RHS cholesky_solve
    small_ridge.py  Gram + Cholesky + solve (+ projection) of a small ridge system in one launch; its dual
                  backward in one launch
    linear_ce.py  fused linear temperature-softmax CE forward; deterministic chunked backward (dW, dX)
    backend.py    the five backend functions of clpdd_fast.reference, implemented with the kernels above
    aot.py        every variant the backend dispatches, compiled ahead of time for a GPU target (sm_90) without a GPU,
                  with its shared memory, registers and spills (`python -m clpdd_fast.kernels.aot`)

Environment variables: TRITON_INTERPRET=1 (set before triton is imported) runs everything on CPU tensors in
Triton's interpreter; CLPDD_AUTOTUNE=1 autotunes the CE kernels (fixed tiles otherwise);
CLPDD_CE_PRECISION (CE only): "auto" (default) splits an fp32 w paired with bf16 x into two bf16 halves for the
tensor cores, "ieee" keeps exact fp32 products for every fp32 operand, "tf32" uses TF32 for fp32 operands.
Gram and Cholesky always use exact fp32 products.
"""
