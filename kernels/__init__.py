"""Triton kernels for clpdd_fast (no autograd, no I/O); installed as `clpdd_fast.kernels` (see setup.py).

    contract.py   what both backends agree on: the compute-dtype rule, the precision words, CEParams (plain torch)
    tiles.py      every fixed tile configuration (plain data)
    matmul.py     strided matmul kernel (split-K into fixed partial slices, accumulate, symmetric lower-tile mode)
                  and the kernels' dtype rules
    gram.py       the Gram matrix x x^T + lam I, on the symmetric matmul
    cholesky.py   blocked left-looking Cholesky (LAPACK-style info) and the many-RHS cholesky_solve
    small_ridge.py  Gram + Cholesky + solve (+ projection) of a small ridge system in one launch; its dual
                  backward in one launch
    linear_ce.py  fused linear temperature-softmax CE: forward + gradients in one pass (each logits tile once), the
                  forward alone and its recomputing backward; deterministic (dW, dX)
    backend.py    the six backend functions of clpdd_fast.reference, implemented with the kernels above

The ground floor of the package: these modules import nothing from clpdd_fast outside clpdd_fast.kernels (a test
guards it) and read no environment variable. Precision and autotuning arrive as arguments, which the ops above read
once per call (clpdd_fast.settings). The compile tools that inspect these kernels live in tools/.
"""
