"""Ahead-of-time compilation of every kernel variant the backend can dispatch, for a GPU that need not be here.

A variant is one compiled specialisation: a kernel with its argument types, its constexpr values (including the integers
Triton specialises, e.g. a stride of 1) and its launch options. The list is not written by hand: `dispatch_launches`
drives clpdd_fast.kernels.backend on meta tensors (shapes and strides, no data) over every input dtype, path, size class
and flag its callers can choose, every launch is recorded instead of run (`recording`), and
Triton's own specialisation rules name the variant each launch would compile (`Variant`). One variant per group
(kernel, constexprs, launch options; operand dtypes that are cast on load only change the width of loads) is then
compiled with Triton's compiler for the target, sm_90 by default: shared memory from its metadata, registers and
spill bytes from the `ptxas -v` log of Triton's own ptxas run, where spills sit from the SASS, and what its main loop
does from the PTX (`loop_summary`: tensor-core instructions, asynchronous copies, synchronous global loads), which
tools/kernel_report.py tabulates for the CE kernels.

    python tools/kernel_aot.py [--arch 90] [--jobs N] [--bench] [--strict] [--every]

prints one row per variant and exits with status 1 when a variant does not compile, needs more shared memory than
the target has, or (a variant the backend dispatches) spills registers inside a loop, unless SPILL_ALLOWANCES gives
the measured reason it stays. A spill outside every loop (ptxas parks a few values in local memory even below the
register limit, depending on its version) costs a few cached accesses per program and passes; --strict fails it too.
--bench adds the variants only benchmarks launch (failing only on shared memory); --every compiles every distinct
specialisation instead of one per group. Autotuned configurations (CLPDD_AUTOTUNE=1) are not compiled: the
autotuner skips a configuration that does not fit. `save_launches` / `load_launches` carry launches recorded
elsewhere (e.g. under the interpreter: benchmarks/compile_cost.py). Runs without TRITON_INTERPRET; `make test` runs
it for sm_90 (tests/test_kernel_aot.py, CLPDD_AOT_CHECK=1).

A tool, not part of the package: it uses Triton's private compiler entry points and stands in for the kernels
(`recording` swaps each module's kernels for recorders, and gives meta tensors the SM count of the target GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from clpdd_fast.kernels import backend as _backend
from clpdd_fast.kernels import cholesky, linear_ce, matmul, small_ridge, tiles
from clpdd_fast.kernels.contract import CE_PRECISIONS, RIDGE_PRECISIONS, CEParams

MODULES = (matmul, cholesky, small_ridge, linear_ce)
TARGET_SMS = 132   # SMs of the GPU that meta tensors stand for (an H100 SXM: sm_90), for the CE's dW split
# largest dynamic shared memory one block may use, by compute capability (bytes)
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# input dtype pairs the backend is driven with: (features phi / x, targets y / weights w). Same-dtype pairs, and the
# pipeline's low-precision features with fp32 targets / probe (fp64 mixes are rejected by the public ops)
DTYPE_PAIRS = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
               (torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
# shapes: the ImageNet feature width and label counts (ImageNet-1K, ImageNet-100); CE rows span several chunks
# (first and later chunks differ in a flag); the blocked ridge path at m = 1000 (dual) and d = 768 (primal)
D, C, C_ONE_TILE, N_CE, M_BLOCKED = 768, 1000, 100, 3 * 8192 + 5, 1000


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` appends (kernel, args, kwargs), and with `run` launches
    the kernel too."""

    def __init__(self, kernel, launches: list, run: bool):
        self.kernel, self.launches, self.run = kernel, launches, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def recording(run: bool = False):
    """Within the block, every kernel launch of kernels/*.py is recorded (into the yielded list) instead of run, or
    with `run` as well as run (then also under TRITON_INTERPRET=1: `save_launches` carries them to a compiling
    process)."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not run:
        raise RuntimeError("tools/kernel_aot.py needs the compiled kernels: run it without TRITON_INTERPRET=1")
    launches, saved = [], []
    for mod in MODULES:
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn"):   # a JITFunction, or the interpreter's stand-in
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, launches, run))
    sm_count = linear_ce._sm_count
    saved.append((linear_ce, "_sm_count", sm_count))
    linear_ce._sm_count = lambda device: TARGET_SMS if device.type == "meta" else sm_count(device)
    try:
        yield launches
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


_TL_DTYPES = {str(t): t for t in (tl.float16, tl.bfloat16, tl.float32, tl.float64)}


def _portable(value):
    """A launch argument as plain data: a tensor as (dtype, shape, strides, its data pointer modulo 16 in elements),
    which is all Triton specialises on; a tl dtype by name."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), tuple(value.shape), value.stride(),
                value.data_ptr() % 16 // value.element_size())
    if isinstance(value, tl.dtype):
        return ("tl", str(value))
    return value


def _restored(value):
    """The inverse of `_portable`: a tensor comes back as a meta tensor with the same layout and alignment."""
    if isinstance(value, tuple) and value and value[0] == "tensor":
        _, dtype, shape, stride, offset = value
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
        base = torch.empty(offset + extent, dtype=getattr(torch, dtype), device="meta")
        return base.as_strided(shape, stride, offset)
    if isinstance(value, tuple) and value and value[0] == "tl":
        return _TL_DTYPES[value[1]]
    return value


def save_launches(launches: list[tuple], path: str) -> None:
    """Write recorded launches as plain data (kernel by module and name)."""
    rows = [(kernel.fn.__module__, kernel.fn.__name__, [_portable(a) for a in args],
             {k: _portable(v) for k, v in kwargs.items()}) for kernel, args, kwargs in launches]
    with open(path, "wb") as f:
        pickle.dump(rows, f)


def load_launches(path: str) -> list[tuple]:
    """Launches written by `save_launches`, with this process's (compiled) kernels and meta tensors."""
    with open(path, "rb") as f:
        rows = pickle.load(f)
    return [(getattr(importlib.import_module(module), name), [_restored(a) for a in args],
             {k: _restored(v) for k, v in kwargs.items()}) for module, name, args, kwargs in rows]


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _small_sizes(dtype: torch.dtype) -> list[int]:
    """One odd system size per padded size class small_ridge accepts for this dtype: up to its limit, past
    tiles.SMALL_RIDGE_MAX_SIZE (tests and `bench_ops.py --ops ridge-small` raise it to the limits)."""
    top = small_ridge.size_limit(dtype)
    sizes, size = [], 16
    while size <= top:
        sizes.append(size - 3 if size > 16 else 10)
        size *= 2
    return sizes


def _ridge(phi_dt, y_dt, size: int, mode: str, precision: str) -> None:
    """Forward and every backward flag combination of a ridge system of this size (the dual m or primal d)."""
    m, d = (size, D) if mode == "dual" else (M_BLOCKED + 7, size)
    phi, y, g = _meta(m, d, dtype=phi_dt), _meta(m, 37, dtype=y_dt), _meta(d, 37, dtype=torch.float32)
    w, factor, _ = _backend.ridge_forward(phi, y, 0.5, mode, precision)
    for need_phi, need_y in ((True, True), (True, False), (False, True)):
        _backend.ridge_backward(phi, y, w, factor, g, mode, need_phi, need_y, precision)


def _linear_ce(x_dt, w_dt) -> None:
    """The CE's forward, recomputing backward and fused forward + backward, each precision mode and gradient flags,
    at C (several class tiles) and at C_ONE_TILE (one class tile: the fused kernel keeps it in registers)."""
    precisions = CE_PRECISIONS if torch.float32 in (x_dt, w_dt) else ("highest",)
    for num_classes in (C, C_ONE_TILE):
        x, w = _meta(N_CE, D, dtype=x_dt), _meta(D, num_classes, dtype=w_dt)
        t = _meta(N_CE, dtype=torch.int64)
        for precision in precisions:
            params = CEParams(0.1, -100, N_CE, precision)
            _, lse = _backend.linear_ce_forward(x, w, t, params)
            grad_rows = _meta(N_CE, dtype=lse.dtype)
            for need_x, need_w in ((True, True), (True, False), (False, True)):
                _backend.linear_ce_backward(x, w, t, lse, grad_rows, params, need_x, need_w)
                _backend.linear_ce_forward_backward(x, w, t, grad_rows, params, need_x, need_w)


def dispatch_launches() -> list[tuple]:
    """Every launch the backend makes over the dtypes, paths, size classes and flags of its callers:
    [(kernel, args, kwargs)], not run."""
    default = tiles.SMALL_RIDGE_MAX_SIZE
    tiles.SMALL_RIDGE_MAX_SIZE = max(tiles.SMALL_RIDGE_LIMITS.values())
    try:
        with recording() as launches:
            for x_dt, y_dt in DTYPE_PAIRS:
                for precision in RIDGE_PRECISIONS:
                    for lam in (0.0, 0.5):
                        _backend.gram(_meta(M_BLOCKED, D, dtype=x_dt), lam, precision)
                    compute = torch.float64 if torch.float64 in (x_dt, y_dt) else torch.float32
                    for mode in ("dual", "primal"):
                        for size in _small_sizes(compute) + [M_BLOCKED if mode == "dual" else D]:
                            _ridge(x_dt, y_dt, size, mode, precision)
                _linear_ce(x_dt, y_dt)
    finally:
        tiles.SMALL_RIDGE_MAX_SIZE = default
    return launches


def bench_launches() -> list[tuple]:
    """The launches only benchmarks make: the blocked Cholesky + solve at each (block, warps) candidate of
    `bench_ops.py --ops cholesky-tiles`."""
    with recording() as launches:
        a, y = _meta(D, D, dtype=torch.float32), _meta(D, C, dtype=torch.float32)
        for block, warps in tiles.CHOLESKY_CANDIDATES:
            factor = cholesky.cholesky(a, block, num_warps=warps)[0]
            cholesky.cholesky_solve(y, factor, block, num_warps=warps)
    return launches


class Variant:
    """One compiled specialisation: what `kernel[grid](*args, **kwargs)` compiles for `target`, by Triton's rules."""

    def __init__(self, kernel: JITFunction, args: tuple, kwargs: dict, backend):
        self.kernel = kernel
        self.launch = (kernel, args, {k: v for k, v in kwargs.items() if k != "debug"})   # as recorded
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        self.options, self.signature, self.constexprs, self.attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options)
        names = list(bound)
        declared = {p.name for p in kernel.params if p.is_constexpr}
        self.flags = {names[k[0]]: v for k, v in self.constexprs.items() if names[k[0]] in declared}
        self.specialised = {names[k[0]]: v for k, v in self.constexprs.items() if names[k[0]] not in declared}
        self.pointers = {k: v for k, v in self.signature.items() if v.startswith("*")}

    def key(self, exact: bool = False) -> str:
        """Identity of the compiled code (with `exact`, the alignment / divisibility hints too)."""
        parts = [self.kernel.fn.__name__, str(sorted(self.signature.items())), str(sorted(self.constexprs.items())),
                 str(self.options.num_warps), str(self.options.num_stages)]
        return "|".join(parts + ([str(sorted(self.attrs.items()))] if exact else []))

    def group(self) -> str:
        """Kernel, constexprs (the specialised integers included: a stride of 1 changes the loads) and launch
        options: the variants of one group differ only in operand dtypes that are cast on load and in divisibility
        hints, i.e. in the width of loads, not in the tiles."""
        return "|".join([self.kernel.fn.__name__, str(sorted(self.constexprs.items())), str(self.options.num_warps),
                         str(self.options.num_stages)])

    def load_width(self) -> tuple[int, int]:
        """(operand bytes, divisibility hints): the larger, the more shared memory and registers loads take."""
        return sum(_BYTES.get(v[1:], 4) for v in self.pointers.values()), len(self.attrs)

    def describe(self) -> tuple[str, str, str]:
        """(kernel, pointer dtypes, constexprs and launch options) for the table."""
        dts = ",".join(dict.fromkeys(v[1:] for v in self.pointers.values() if v not in ("*i32", "*i64")))
        flags = " ".join(f"{k}={_short(v)}" for k, v in self.flags.items())
        ones = ",".join(k for k, v in self.specialised.items() if v == 1)
        opts = f"w{self.options.num_warps} s{self.options.num_stages}" + (f" {ones}=1" if ones else "")
        return self.kernel.fn.__name__.strip("_").removesuffix("_kernel"), dts, f"{flags} {opts}"


_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8, "i32": 4, "i64": 8}


def _short(v) -> str:
    s = str(v)
    return s.removeprefix("triton.language.").removeprefix("tl.") if not isinstance(v, bool) else s[0]


def variants(launches: list[tuple], arch: int, every: bool = False) -> list[Variant]:
    """The variants of these launches, in first-launch order: one per group (its widest loads: the most shared
    memory and registers), or with `every`, every distinct compile (operand dtypes and hints included)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    chosen: dict[str, Variant] = {}
    for kernel, args, kwargs in launches:
        v = Variant(kernel, args, {"debug": False, **kwargs}, backend)
        key = v.key(exact=True) if every else v.group()
        if key not in chosen or (not every and v.load_width() > chosen[key].load_width()):
            chosen[key] = v
    return list(chosen.values())


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_resources(log: str) -> tuple[int, int]:
    """(registers, spill bytes: the larger of stores and loads) from the `ptxas -v` log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spill):
        raise RuntimeError(f"no resource usage in the ptxas log: {log[-300:]!r}")
    return int(regs.group(1)), max(int(spill.group(1)), int(spill.group(2)))


def spills_in_loops(sass: str) -> int:
    """How many local-memory accesses (STL/LDL: spills) of this SASS (`cuobjdump -sass`) lie inside a loop, i.e.
    between a backward branch's target and the branch. A branch whose target cannot be read makes every access
    count (the safe side)."""
    code = [(int(addr, 16), text) for addr, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spills = [addr for addr, text in code if re.search(r"\b(STL|LDL)\b", text)]
    loops = []
    for addr, text in code:
        if re.search(r"\bBRA\b", text):
            target = re.search(r"\bBRA\S*\s+0x([0-9a-f]+)", text)
            if not target:
                return len(spills)
            if int(target.group(1), 16) <= addr:
                loops.append((int(target.group(1), 16), addr))
    return sum(any(start <= addr <= stop for start, stop in loops) for addr in spills)


_BLOCK = re.compile(r"^(?:\$L__(BB\d+_\d+)|// %(bb\.\d+)):")
_PRODUCTS = re.compile(r"\b(wgmma\.mma_async|mma\.sync|fma\.rn)\S*")


def ptx_loops(ptx: str) -> dict[str, dict]:
    """The innermost loops of a kernel's PTX: {header block: {"depth", "text"}}, text the PTX of the loop's blocks.

    Read from the loop annotations LLVM writes beside each basic block's label ("=>This Inner Loop Header: Depth=2",
    "in Loop: Header=BB0_4 Depth=2"): a loop's blocks need not be contiguous in the text."""
    blocks = []   # [name, annotations, lines]
    for line in ptx.splitlines():
        label = _BLOCK.match(line)
        if label:
            blocks.append([label.group(1) or label.group(2), line[label.end():], []])
        elif blocks and not blocks[-1][2] and line.strip().startswith("//"):
            blocks[-1][1] += " " + line.strip()      # annotation lines under the label
        elif blocks:
            blocks[-1][2].append(line)
    loops: dict[str, dict] = {}
    for name, notes, _ in blocks:
        inner = re.search(r"=>\s*This Inner Loop Header: Depth=(\d+)", notes)
        if inner:
            loops[name] = {"depth": int(inner.group(1)), "text": []}
    for name, notes, lines in blocks:
        member = re.search(r"in Loop: Header=(BB\d+_\d+)", notes)
        owner = name if name in loops else member.group(1) if member else None
        if owner in loops:
            loops[owner]["text"] += lines
    return {name: {"depth": loop["depth"], "text": "\n".join(loop["text"])} for name, loop in loops.items()}


def _access_bytes(instruction: str) -> int:
    """Bytes moved by one ld.global / st.global instruction (its vector width times its element size)."""
    vec = re.search(r"\.v(\d)\b", instruction)
    bits = re.search(r"\.[bfsu](\d+)\b", instruction)
    return (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 4)


def loop_access(text: str) -> dict:
    """What one loop's PTX does with global memory and products: the tensor-core instruction ("wgmma", "mma" or ""
    for CUDA-core FMA products), asynchronous copies to shared memory (cp.async, with the widest copy in bytes;
    TMA bulk copies), synchronous global loads (count, widest in bytes) and the number of product instructions."""
    copies = [int(size, 0) for size in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)",
                                                  text)]
    loads = [_access_bytes(m) for m in re.findall(r"\bld\.global\S*", text)]
    return dict(tensor_cores="wgmma" if "wgmma.mma_async" in text else "mma" if "mma.sync" in text else "",
                async_copies=len(copies), async_bytes=max(copies, default=0),
                tma=len(re.findall(r"\bcp\.async\.bulk", text)),
                sync_loads=len(loads), sync_bytes=max(loads, default=0),
                products=len(_PRODUCTS.findall(text)))


def loop_summary(ptx: str) -> dict:
    """The main loop of a kernel (its GEMM loop: the innermost loop with tensor-core instructions, else the one with
    the most FMA instructions) as `loop_access` gives it, and the other innermost loops' accesses under "others";
    {} without a loop."""
    loops = sorted((loop_access(loop["text"]) for loop in ptx_loops(ptx).values()),
                   key=lambda acc: (bool(acc["tensor_cores"]), acc["products"]), reverse=True)
    return {**loops[0], "others": loops[1:]} if loops else {}


# Spills that stay in a loop, each with its reason: (kernel, constexprs that single the variants out, as the table
# writes them, why), measured with this check on sm_90a with triton 3.8 / 3.6. A spill inside a loop of any other
# dispatched variant fails the check.
SPILL_ALLOWANCES: list[tuple[str, dict[str, str], str]] = [
    ("_matmul_kernel", {"DOT_DTYPE": "fp64", "ACCUMULATE": "T", "s_ak": "1", "s_bk": "1"},
     "fp64 accumulation into dphi of the blocked primal ridge backward: 40 / 20 bytes per thread, 11 / 5 accesses "
     "in the K loop; fp64 inputs only (tests)"),
    ("_matmul_kernel", {"SYMMETRIC": "F", "DOT_DTYPE": "fp32", "BLOCK_M": "64", "ACCUMULATE": "F", "s_ak": "1",
                        "s_bk": "1"},
     "alpha G^T of the blocked dual ridge backward (both operands contiguous along K): 12 bytes per thread, one "
     "access in the K loop with triton 3.8, none with 3.6"),
]


def spill_allowance(v: Variant) -> str | None:
    """The reason a spill of this variant stays, when SPILL_ALLOWANCES gives one."""
    values = {k: _short(x) for k, x in {**v.flags, **v.specialised}.items()}
    for kernel, match, why in SPILL_ALLOWANCES:
        if kernel == v.kernel.fn.__name__ and all(values.get(k) == x for k, x in match.items()):
            return why
    return None


_TODO: list = []   # (Variant, arch) of the current run, read by forked workers


def compile_one(i: int) -> dict:
    """Compile variant i of _TODO with Triton (its own ptxas run, whose -v log is read; the cache is bypassed so
    that ptxas always runs); {shared, regs, spill, in_loops, seconds} or {error}."""
    v, arch = _TODO[i]
    start = time.time()
    knobs = triton.knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(v.kernel, v.signature, v.constexprs, v.attrs),
                               target=GPUTarget("cuda", arch, 32), options=v.options.__dict__)
        regs, spill = ptxas_resources(log.getvalue())
        in_loops = 0
        if spill:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(k.asm["cubin"])
                sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                                      check=True).stdout
            in_loops = spills_in_loops(sass)
        return dict(shared=k.metadata.shared, regs=regs, spill=spill, in_loops=in_loops,
                    loop=loop_summary(k.asm["ptx"]), seconds=time.time() - start)
    except Exception as err:   # a compile error is a result of the check: reported, and fails it
        return dict(error=f"{type(err).__name__}: {str(err)[:300]}", seconds=time.time() - start)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved


def compile_all(todo: list[Variant], arch: int, jobs: int) -> list[dict]:
    """Compile every variant, `jobs` processes at a time (forked: the variants need not be picklable)."""
    _TODO[:] = [(v, arch) for v in todo]
    if jobs <= 1:
        return [compile_one(i) for i in range(len(todo))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(compile_one, range(len(todo)), chunksize=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--bench", action="store_true", help="also the variants only benchmarks launch (Cholesky block "
                   "widths and warps of bench_ops.py --ops cholesky-tiles)")
    p.add_argument("--strict", action="store_true", help="fail on any spill of a dispatched variant, also one that "
                   "lies outside every loop")
    p.add_argument("--every", action="store_true", help="compile every distinct specialisation (operand dtypes and "
                   "integer hints), not one per group of kernel, constexprs and launch options")
    args = p.parse_args(argv)
    limit = SHARED_LIMITS.get(args.arch, 99 * 1024)
    start = time.time()
    hot = variants(dispatch_launches(), args.arch, args.every)
    hot_keys = {v.group() for v in hot}
    bench = [v for v in variants(bench_launches(), args.arch, args.every) if v.group() not in hot_keys] \
        if args.bench else []
    todo = hot + bench
    print(f"# {len(hot)} dispatched + {len(bench)} benchmark-only variants, sm_{args.arch}, triton "
          f"{triton.__version__}, {args.jobs} compile processes", flush=True)
    results = compile_all(todo, args.arch, args.jobs)
    failures = []
    print(f"{'kernel':<21} {'dtypes':<10} {'smem KB':>7} {'regs':>4} {'spill B':>7} {'in loop':>7} {'s':>5}  "
          "constexprs, warps, stages")
    for v, r in zip(todo, results):
        name, dts, flags = v.describe()
        what = f"{name} {dts} {flags}"
        if "error" in r:
            print(f"{name:<21} {dts:<10} compile error  {flags}")
            failures.append(f"{what}: {r['error']}")
            continue
        allowed = spill_allowance(v) if r["spill"] else None
        note = "  (benchmark only)" if v not in hot else "  (allowed: see SPILL_ALLOWANCES)" if allowed else ""
        print(f"{name:<21} {dts:<10} {r['shared'] / 1024:>7.1f} {r['regs']:>4} {r['spill']:>7} {r['in_loops']:>7} "
              f"{r['seconds']:>5.1f}  {flags}{note}")
        if r["shared"] > limit:
            failures.append(f"{what}: {r['shared']} bytes of shared memory > {limit}")
        if v in hot and (r["in_loops"] if not args.strict else r["spill"]) and not allowed:
            failures.append(f"{what}: spills {r['spill']} bytes per thread to local memory "
                            f"({r['in_loops']} accesses inside loops)")
    print(f"# {len(todo)} variants compiled in {time.time() - start:.0f} s wall")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
