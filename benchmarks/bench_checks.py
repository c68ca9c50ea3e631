"""Cost of the ops' checks: clpdd_loss forward + backward on the CPU with check_finite on and off.

Each configuration runs in its own process (its peak resident set is its own), after building its inputs: synthetic
features (m, d) fp32 that need a gradient, real features (N, d) bf16 as a feature cache holds them, labels; and after
one tiny warm-up call (a process's first call of a torch custom op imports torch._dynamo: ~2 s once). Reported:
seconds of the forward and of the backward, and the peak resident set beyond the inputs (sampled every millisecond).
`--pythonpath DIR` measures the clpdd_fast of another checkout (e.g. an older commit) the same way, in the same run.

    python3 benchmarks/bench_checks.py                         # the ImageNet-1K shape: N = 1,281,167, d = 768, C = m = 1000
    python3 benchmarks/bench_checks.py --n 200000 --no-append
    python3 benchmarks/bench_checks.py --pythonpath /tmp/old   # also the checkout in /tmp/old
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RssSampler, Table, results_header, unit_rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_281_167, help="real feature rows N")
    p.add_argument("--d", type=int, default=768, help="feature dimension")
    p.add_argument("--classes", type=int, default=1000, help="classes C")
    p.add_argument("--m", type=int, default=1000, help="synthetic images m")
    p.add_argument("--pythonpath", action="append", default=[], help="also measure the clpdd_fast found here")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(cfg: dict) -> dict:
    import torch
    from clpdd_fast import clpdd_loss

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    n, d, c, m = cfg["n"], cfg["d"], cfg["classes"], cfg["m"]
    phi_r = unit_rows(n, d, torch.bfloat16, g)
    y_r = torch.randint(0, c, (n,), generator=g)
    phi_s = (torch.randn(m, d, generator=g) / d ** 0.5).requires_grad_(True)
    y_s = torch.arange(m) % c
    warm = torch.randn(4, d, requires_grad=True)   # first call: torch's one-time imports (custom ops load dynamo)
    clpdd_loss(warm, torch.arange(4) % 2, warm.detach(), torch.arange(4) % 2, 1.0, num_classes=2).backward()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        loss = clpdd_loss(phi_s, y_s, phi_r, y_r, 1.0, 0.05, num_classes=c, check_finite=cfg["check_finite"])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
    import clpdd_fast
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "peak_extra_mib": rss.peak - rss.base,
            "loss": float(loss), "package": str(Path(clpdd_fast.__file__).parent.parent)}


def version(path: str | None) -> str:
    where = path or str(HERE.parent)
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=where, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return where


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    shape = f"N={args.n} bf16, d={args.d}, C={args.classes}, m={args.m}"
    table = Table(None if args.no_append else str(HERE / "RESULTS.md"),
                  results_header("bench_checks.py (clpdd_loss forward + backward)", f"CPU, {os.cpu_count()} cores",
                                 "python3 benchmarks/bench_checks.py " + " ".join(argv or sys.argv[1:])),
                  ["clpdd_fast", "check_finite", "shape", "forward s", "backward s", "peak extra MiB", "loss"])
    for path in [None, *args.pythonpath]:
        env = dict(os.environ)
        if path:
            env["PYTHONPATH"] = os.path.abspath(path) + os.pathsep + env.get("PYTHONPATH", "")
        for flag in (True, False):
            cfg = dict(vars(args), check_finite=flag)
            cfg.pop("one")
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                                 env=env, cwd=path or None)
            if out.returncode:
                raise SystemExit(f"error: the measurement failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if os.path.realpath(r["package"]) != os.path.realpath(path or HERE.parent):
                raise SystemExit(f"error: measured the clpdd_fast in {r['package']}, not the one asked for")
            table.row(version(path), flag, shape, f"{r['forward_s']:.2f}", f"{r['backward_s']:.2f}",
                      f"{r['peak_extra_mib']:.0f}", f"{r['loss']:.6f}")


if __name__ == "__main__":
    main()
