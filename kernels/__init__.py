"""Triton kernels for clpdd_fast (no autograd, no I/O); installed as `clpdd_fast.kernels` (see setup.py).

    matmul.py     strided matmul kernel (split-K into fixed partial slices, accumulate, symmetric lower-tile mode)
                  and the kernels' dtype rules
    gram.py       the Gram matrix x x^T + lam I, on the symmetric matmul
    cholesky.py   blocked left-looking Cholesky (LAPACK-style info) and the many-RHS cholesky_solve
    small_ridge.py  Gram + Cholesky + solve (+ projection) of a small ridge system in one launch; its dual
                  backward in one launch
    linear_ce.py  fused linear temperature-softmax CE: forward + gradients in one pass (each logits tile once), the
                  forward alone and its recomputing backward; deterministic (dW, dX)
    backend.py    the five backend functions of clpdd_fast.reference, implemented with the kernels above
    aot.py        every variant the backend dispatches, compiled ahead of time for a GPU target (sm_90) without a GPU,
                  with its shared memory, registers and spills (`python -m clpdd_fast.kernels.aot`)
    report.py     the CE kernels at the ImageNet shapes compiled for sm_90: registers, spills, shared memory, and
                  from the PTX the main loop's asynchronous copies and tensor-core instructions

The kernels import only clpdd_fast.reference (the compute-dtype rule, the ridge system) and clpdd_fast.settings (the
environment variables TRITON_INTERPRET, CLPDD_AUTOTUNE, CLPDD_CE_PRECISION and CLPDD_RIDGE_PRECISION: README.md has
the table). CLPDD_AUTOTUNE and CLPDD_CE_PRECISION change the CE kernels only; CLPDD_RIDGE_PRECISION the products of
the Gram matrix and the blocked ridge path (backend.py).
"""
