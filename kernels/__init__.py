"""Triton kernels for clpdd_fast (no autograd, no I/O)."""
