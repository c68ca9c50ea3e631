"""Fidelity table on the embedded default: baselines, LGM and CLP-DD under one evaluation protocol.

    python benchmarks/fidelity.py                  # ipc = 1: every row + the lam / tau sweep, then FIDELITY.md
    python benchmarks/fidelity.py --ipc 10 --no-sweep
    python benchmarks/fidelity.py --sweep-aug       # lam / tau around the defaults with augmentation (own section)
    python benchmarks/fidelity.py --only clpdd-ce,random   # run a subset of rows (the report keeps every finished row)
    python benchmarks/fidelity.py --schedule        # the schedule study and its plot (benchmarks/fidelity_schedule.py)

Every row is two ordinary CLI commands run as child processes (printed in the table, so each row can be reproduced by
hand): `python -m clpdd_fast.distill ...` (distilled rows only) and `python -m clpdd_fast.evaluate ... --json`.
The evaluation is the same for every row (LGM's linear-probe protocol, 1000 epochs, 5 seeds, flip + random-resized-crop
with 32 cached draws per image, clpdd_fast/probe_protocol.py); nothing is tuned per method.
Wall-clock and peak memory are those of the distillation child process: peak memory is the child's maximum resident
set size from os.wait4's rusage (ru_maxrss; the whole process: interpreter, torch, encoder, Fashion-MNIST in memory,
the real-feature cache pages it touched), so differences between rows are what the methods add.
Results go to runs/fidelity/ipc<k>/<row>/ (eval.json, distill.json with time and memory); a finished row is reused
unless --force. The markdown table is written to benchmarks/FIDELITY.md (section per ipc, replaced on rerun).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from datetime import date
from pathlib import Path

from common import HERE, PY, ROOT, command, run_child

LGM_K = 10  # LGM's default number of augmented copies per step; the -k3 rows use its authors' ImageNet-1K setting


def rows(ipc: int, sweep: bool, sweep_aug: bool = False) -> list[tuple[str, list[str] | None, list[str]]]:
    """(row name, distill arguments or None for a baseline, evaluate arguments of a baseline). sweep_aug: only the
    lam / tau sweep with the default augmentation, around the defaults (lam 1, tau 0.05), all flags explicit."""
    base = ["--ipc", str(ipc)]
    if sweep_aug:
        aug = base + ["--method", "clpdd", "--augment", "standard"]
        points = [("default", "1", "0.05"), ("lam0.1", "0.1", "0.05"), ("lam10", "10", "0.05"),
                  ("tau0.01", "1", "0.01"), ("tau0.2", "1", "0.2")]
        return [(f"sweep-aug-{name}", aug + ["--lam", lam, "--tau", tau], []) for name, lam, tau in points]
    table = [
        ("full", None, ["--baseline", "full"]),
        ("random", None, ["--baseline", "random", "--ipc", str(ipc)]),
        ("centroids", None, ["--baseline", "centroids", "--ipc", str(ipc)]),
        ("lgm-aug", base + ["--method", "lgm", "--augment", "standard", "--augs-per-batch", str(LGM_K)], []),
        ("lgm-noaug", base + ["--method", "lgm", "--augment", "none", "--augs-per-batch", str(LGM_K)], []),
        ("lgm-aug-k3", base + ["--method", "lgm", "--augment", "standard", "--augs-per-batch", "3"], []),
        ("lgm-noaug-k3", base + ["--method", "lgm", "--augment", "none", "--augs-per-batch", "3"], []),
        ("clpdd-ce", base + ["--method", "clpdd", "--outer", "ce", "--augment", "none"], []),
        ("clpdd-mse", base + ["--method", "clpdd", "--outer", "mse", "--augment", "none"], []),
        ("clpdd-ce-aug", base + ["--method", "clpdd", "--outer", "ce", "--augment", "standard"], []),
    ]
    if sweep:
        for lam in ("0.01", "0.1", "10"):  # around the default lam = 1
            table.append((f"sweep-lam{lam}", base + ["--method", "clpdd", "--augment", "none", "--lam", lam], []))
        for tau in ("0.01", "0.2", "1"):
            table.append((f"sweep-tau{tau}", base + ["--method", "clpdd", "--augment", "none", "--tau", tau], []))
        table.append(("sweep-features-raw", base + ["--method", "clpdd", "--augment", "none", "--features", "raw"],
                      []))
    return table


def run_logged(name: str, stage: str, cmd: list[str], folder: Path) -> tuple[float, float] | None:
    """Run one stage ('distill' or 'eval') of a row with its output in folder/<stage>.log; (wall s, peak RSS MiB),
    or None (said on stdout) when it failed."""
    print(f"[fidelity] {stage} {name}: {command(cmd)}", flush=True)
    with open(folder / f"{stage}.log", "w") as log:
        wall, rss, rc = run_child(cmd, log)
    if rc != 0:
        print(f"[fidelity] {name}: {stage} failed (rc {rc}), see {folder / f'{stage}.log'}")
        return None
    return wall, rss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--no-sweep", action="store_true", help="skip the lam / tau sweep")
    p.add_argument("--sweep-aug", action="store_true", help="only the lam / tau sweep with --augment standard, in a "
                   "report section of its own")
    p.add_argument("--only", default=None, help="comma list of row names")
    p.add_argument("--force", action="store_true", help="rerun finished rows")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="runs/fidelity")
    p.add_argument("--report", default=str(HERE / "FIDELITY.md"))
    p.add_argument("--schedule", action="store_true", help="the schedule study (benchmarks/fidelity_schedule.py): "
                   "protocol top-1 against steps and seconds, CLP-DD and LGM, several distillation seeds")
    p.add_argument("--jobs", type=int, default=1, help="--schedule: runs side by side")
    p.add_argument("--threads", type=int, default=2, help="--schedule: intra-op threads of each child")
    p.add_argument("--report-only", action="store_true", help="--schedule: only rewrite the table and the plot")
    args = p.parse_args(argv)
    if args.schedule:
        import fidelity_schedule
        return fidelity_schedule.main(args)
    root = ROOT / args.out / f"ipc{args.ipc}"
    root.mkdir(parents=True, exist_ok=True)
    selected = set(args.only.split(",")) if args.only else None
    results = []
    for name, distill_args, eval_args in rows(args.ipc, not args.no_sweep, args.sweep_aug):
        folder = root / name
        eval_json = folder / "eval.json"
        distill_json = folder / "distill.json"
        # rows left out by --only still appear in the report when they finished earlier
        run_it = not selected or name in selected
        if not run_it and not eval_json.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rel = folder.relative_to(ROOT)
        d_cmd = None
        if distill_args is not None:
            d_cmd = [PY, "-m", "clpdd_fast.distill", *distill_args, "--out", str(rel)]
            if run_it and (args.force or not distill_json.exists()):
                for stale in ("checkpoint.pt", "distilled.pt"):
                    (folder / stale).unlink(missing_ok=True)
                done = run_logged(name, "distill", d_cmd, folder)
                if done is None:
                    continue
                wall, rss = done
                ridge = json.loads((folder / "results.json").read_text())["ridge_top1"]
                distill_json.write_text(json.dumps({"wall_s": wall, "peak_rss_mib": rss, "ridge_top1": ridge,
                                                    "command": command(d_cmd)}, indent=2))
            e_cmd = [PY, "-m", "clpdd_fast.evaluate", "--distilled", str(rel), "--json", str(rel / "eval.json"),
                     "--seeds", str(args.seeds)]
        else:
            e_cmd = [PY, "-m", "clpdd_fast.evaluate", *eval_args, "--json", str(rel / "eval.json"),
                     "--seeds", str(args.seeds)]
        if run_it and (args.force or not eval_json.exists()):
            if run_logged(name, "eval", e_cmd, folder) is None:
                continue
        ev = json.loads(eval_json.read_text())
        dj = json.loads(distill_json.read_text()) if distill_json.exists() else None
        if dj is not None and (folder / "metrics.jsonl").exists():
            steps = sorted(json.loads(line)["step_time_s"] for line in (folder / "metrics.jsonl").read_text().split("\n")
                           if line.strip())
            dj["median_step_s"] = steps[len(steps) // 2] if steps else None
        results.append({"name": name, "eval": ev, "distill": dj, "distill_cmd": d_cmd and command(d_cmd),
                        "eval_cmd": command(e_cmd)})
        print(f"[fidelity] {name}: top-1 {100 * ev['top1_mean']:.2f} +- {100 * ev['top1_std']:.2f} %", flush=True)
    write_report(Path(args.report), args.ipc, results, args.seeds, " sweep-aug" if args.sweep_aug else "")
    return 0


def write_report(path: Path, ipc: int, results: list[dict], seeds: int, section: str = "") -> None:
    key = f"ipc={ipc}{section}"
    lines = [f"<!-- fidelity {key} begin -->", f"### ipc = {ipc}{section} ({date.today().isoformat()}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch CPU)", "",
             f"| row | protocol top-1 % (mean ± std, {seeds} seeds) | top-5 % | ridge top-1 % | distill wall s | "
             "median s/step | distill peak RSS MiB | commands |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ev, dj = r["eval"], r["distill"]
        cmds = (f"`{r['distill_cmd']}` then " if r["distill_cmd"] else "") + f"`{r['eval_cmd']}`"
        lines.append(f"| {r['name']} | {100 * ev['top1_mean']:.2f} ± {100 * ev['top1_std']:.2f} | "
                     f"{100 * ev['top5_mean']:.2f} ± {100 * ev['top5_std']:.2f} | {100 * ev['ridge_top1_mean']:.2f} | "
                     f"{dj['wall_s']:.0f} | {dj.get('median_step_s') or float('nan'):.2f} | {dj['peak_rss_mib']:.0f} | "
                     f"{cmds} |" if dj else
                     f"| {r['name']} | {100 * ev['top1_mean']:.2f} ± {100 * ev['top1_std']:.2f} | "
                     f"{100 * ev['top5_mean']:.2f} ± {100 * ev['top5_std']:.2f} | {100 * ev['ridge_top1_mean']:.2f} | "
                     f"– | – | – | {cmds} |")
    lines.append(f"<!-- fidelity {key} end -->")
    block = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else "# Fidelity\n\n"
    mark = re.escape(key)
    pattern = re.compile(rf"<!-- fidelity {mark} begin -->.*?<!-- fidelity {mark} end -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    print(f"[fidelity] table written to {path}")


if __name__ == "__main__":
    sys.exit(main())
