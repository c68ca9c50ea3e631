"""Developer tools around the kernels (not installed with the package): they compile every kernel variant for a GPU
that need not be here and report what the compiler made of them. Run from the repository root:

    python tools/kernel_aot.py      every variant the backend dispatches, compiled for sm_90: shared memory,
                                    registers, spills (CLPDD_AOT_CHECK=1 in `make test` runs it)
    python tools/kernel_report.py   the CE kernels at the ImageNet shapes: registers, spills, shared memory, and the
                                    main loop's asynchronous copies and tensor-core instructions
"""
