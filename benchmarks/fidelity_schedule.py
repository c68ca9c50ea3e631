"""Schedule study: protocol top-1 against outer steps and against seconds of steps, CLP-DD and LGM.

    python benchmarks/fidelity.py --schedule [--jobs 1] [--threads 2] [--only RUN,...]   # measure, then report
    python benchmarks/fidelity.py --schedule --report-only                                # table and plot again

Each run distills in stages: `distill --iterations N1 --out RUN/run`, then `distill --resume --iterations N2 ...`, ...
The learning rate is constant and nothing in a step depends on the total number of steps, so the state after N steps
of a long run is the state a run of N steps ends with, and --resume continues exactly. After each stage the distilled
set is copied to RUN/step-N/ and evaluated with the protocol (`evaluate`, 5 probe seeds). Stage 0 is the
initialisation (random real images of the run's seed, the same images for both methods at one seed; with
--init centroids the centroids baseline's images).
Seconds are the summed wall seconds of the steps (metrics.jsonl's step_time_s) up to step N: what the method costs,
without start-up, feature caching, checkpoints and evaluation; their CPU seconds (step_cpu_s) are kept beside them.
A curve's seconds at a stage are the median over its seeds. Runs go to runs/fidelity/schedule/<run>/ and are reused
when finished (a stage whose eval.json exists is skipped; an interrupted stage resumes from the run's checkpoint).
Every child runs with --threads intra-op threads; --jobs runs run side by side. The default, one run at a time with
two threads, gives every method the whole 2-core machine (on a machine whose two CPUs share a core, two runs side by
side slow each other's steps by ~3x, in CPU seconds too, so side-by-side timings would not be comparable).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from common import HERE, PY, ROOT, command, run_child

SEEDS = 5  # probe seeds per evaluation


@dataclass(frozen=True)
class Run:
    ipc: int
    row: str            # the curve: method, parameterisation, K, lr
    seed: int           # distillation seed
    args: tuple         # distill arguments other than --ipc, --seed, --iterations, --out, --resume
    stages: tuple       # steps after which the set is evaluated
    part: str = ""      # a second run of the same curve and seed (more stages without redoing the first run's)

    @property
    def name(self) -> str:
        return f"ipc{self.ipc}-{self.row}-s{self.seed}{self.part}"


def _clpdd(param="pixel", lr="0.05"):
    return ("--method", "clpdd", "--param", param, "--lr", lr)


def _lgm(k, param="pixel", lr="0.05"):
    return ("--method", "lgm", "--augs-per-batch", str(k), "--param", param, "--lr", lr)


# In priority order (the first ones are the headline rows). Stage lists give both methods about equal seconds of
# steps on one core: CLP-DD's ipc = 1 step is ~1/2 of LGM K = 3's and ~1/7 of LGM K = 10's.
RUNS = [
    Run(1, "clpdd-pixel", 0, _clpdd(), (0, 200, 1000, 3000, 5000)),
    Run(1, "lgm-k3-pixel", 0, _lgm(3), (0, 200, 500, 1000, 1500)),
    Run(10, "clpdd-pixel", 0, _clpdd(), (0, 200, 500)),
    Run(10, "lgm-k3-pixel", 0, _lgm(3), (0, 50, 125)),
    Run(1, "clpdd-pixel", 1, _clpdd(), (0, 200, 1000, 3000)),
    Run(1, "clpdd-pixel", 2, _clpdd(), (0, 200, 1000, 3000)),
    Run(1, "lgm-k3-pixel", 1, _lgm(3), (0, 200, 500, 1000, 1500)),
    Run(1, "lgm-k3-pixel", 2, _lgm(3), (0, 200, 500, 1000, 1500)),
    Run(1, "lgm-k10-pixel", 0, _lgm(10), (0, 100, 200)),
    Run(1, "clpdd-pyramid", 0, _clpdd("pyramid"), (0, 1000, 3000)),
    Run(1, "lgm-k3-pyramid", 0, _lgm(3, "pyramid"), (0, 500, 1500)),
    # step 400 of the same three seeds (the same trajectories: runs are deterministic on one machine): a CLP-DD point
    # within the seconds of LGM's first stages
    *(Run(1, "clpdd-pixel", s, _clpdd(), (400,), "-b") for s in (0, 1, 2)),
    Run(1, "clpdd-pixel-lr0.02", 0, _clpdd(lr="0.02"), (1000,)),
    Run(1, "clpdd-pixel-lr0.1", 0, _clpdd(lr="0.1"), (1000,)),
    Run(1, "clpdd-pyramid-lr0.2", 0, _clpdd("pyramid", "0.2"), (1000,)),
    # ipc = 10: why the protocol stays flat while the ridge score rises (seed 0: outer loss, lam, lr, start)
    Run(10, "clpdd-pixel-mse", 0, _clpdd() + ("--outer", "mse"), (200, 500, 1000)),
    Run(10, "clpdd-pixel-mse-noaug", 0, _clpdd() + ("--outer", "mse", "--augment", "none"), (200, 500)),
    Run(10, "clpdd-pixel-lam0.1", 0, _clpdd() + ("--lam", "0.1"), (200,)),
    Run(10, "clpdd-pixel-lr0.02", 0, _clpdd(lr="0.02"), (200, 500)),
    # starting from the centroids baseline's images (step 0 = that baseline)
    Run(10, "clpdd-pixel-centroids", 0, _clpdd() + ("--init", "centroids"), (0, 200, 500)),
    Run(10, "clpdd-pixel-mse-centroids", 0, _clpdd() + ("--outer", "mse", "--init", "centroids"), (200, 500, 1000)),
    # the ipc = 10 curves at two more seeds: the default (CE), LGM, and MSE from the centroids (the best at seed 0;
    # the start is the same images at every seed, the seed draws the augmentations)
    *(Run(10, "clpdd-pixel", s, _clpdd(), (0, 200, 500)) for s in (1, 2)),
    *(Run(10, "lgm-k3-pixel", s, _lgm(3), (0, 50, 125)) for s in (1, 2)),
    Run(1, "clpdd-pixel-mse", 0, _clpdd() + ("--outer", "mse"), (200, 1000)),   # ipc = 1: MSE
    Run(10, "clpdd-pixel-mse-centroids", 1, _clpdd() + ("--outer", "mse", "--init", "centroids"), (200, 500, 1000)),
    Run(1, "lgm-k10-pixel", 1, _lgm(10), (0, 100, 200)),
    Run(10, "clpdd-pixel-mse-centroids", 2, _clpdd() + ("--outer", "mse", "--init", "centroids"), (200, 500, 1000)),
    Run(1, "lgm-k10-pixel", 2, _lgm(10), (0, 100, 200)),
    # ipc = 1: the centroids start
    Run(1, "clpdd-pixel-centroids", 0, _clpdd() + ("--init", "centroids"), (0, 1000, 3000)),
    # a softer CE at ipc = 10
    Run(10, "clpdd-pixel-tau0.2", 0, _clpdd() + ("--tau", "0.2"), (200,)),
    Run(10, "clpdd-pixel-tau1", 0, _clpdd() + ("--tau", "1"), (200,)),
    # LGM's learning rate (K = 3, 1000 steps)
    Run(1, "lgm-k3-pixel-lr0.02", 0, _lgm(3, lr="0.02"), (1000,)),
    Run(1, "lgm-k3-pixel-lr0.1", 0, _lgm(3, lr="0.1"), (1000,)),
    # the pyramid with every level active from the start (the real image it starts from is then visible at step 0)
    Run(1, "clpdd-pyramid-grow0", 0, _clpdd("pyramid") + ("--grow-every", "0"), (0, 1000)),
    # MSE from random real images at two more seeds
    *(Run(10, "clpdd-pixel-mse", s, _clpdd() + ("--outer", "mse"), (0, 200, 500)) for s in (1, 2)),
    # the CLP-DD learning-rate probes at two more seeds
    *(Run(1, f"clpdd-pixel-lr{lr}", s, _clpdd(lr=lr), (1000,)) for s in (1, 2) for lr in ("0.02", "0.1")),
]
# The CLP-DD rows of the equal-time table (each against every LGM pixel row of its ipc): the default recipe, and the
# MSE outer loss (from random real images and from the centroids), which the ipc = 10 probes found ahead there
EQUAL_TIME_ROWS = ("clpdd-pixel", "clpdd-pixel-mse", "clpdd-pixel-mse-centroids")
# The curves drawn in the plot (the probes of one setting are in the table only)
PLOT_ROWS = EQUAL_TIME_ROWS + ("lgm-k3-pixel", "lgm-k10-pixel", "clpdd-pyramid", "lgm-k3-pyramid")
BASELINES = [(ipc, b) for ipc in (1, 10) for b in ("centroids", "random")]
# The literal protocol (fresh draws every epoch, `evaluate --aug-draws 0`) against the cached-draw pool on two sets:
# (name, the folder whose eval.json holds the pooled result, evaluate arguments naming the same images)
LITERAL = [("ipc1-centroids", "ipc1-centroids", ("--baseline", "centroids", "--ipc", "1")),
           ("ipc1-clpdd-pixel-s0-step-1000", "ipc1-clpdd-pixel-s0/step-1000",
            ("--distilled", "runs/fidelity/schedule/ipc1-clpdd-pixel-s0/step-1000"))]

# Cross-encoder transfer (LGM's cross-model table on the proxy): distill with each encoder at the default recipe,
# evaluate every distilled set with each encoder; centroids per evaluation encoder for reference.
ENCODERS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")

_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(f"[schedule] {time.strftime('%H:%M:%S')} {text}", flush=True)


def child(cmd: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run cmd with `threads` intra-op threads, output appended to log; (wall s, peak RSS MiB). Raises on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "a") as f:
        f.write(f"$ {command(cmd)}\n")
        f.flush()
        wall, rss, rc = run_child(cmd, f, env)
    if rc != 0:
        raise RuntimeError(f"{command(cmd)} failed (rc {rc}), see {log}")
    return wall, rss


def step_seconds(metrics: Path, step: int) -> tuple[float, float]:
    """(wall, CPU) seconds summed over steps 1..step: metrics.jsonl's step_time_s and step_cpu_s, one line per step."""
    if step == 0:
        return 0.0, 0.0
    rows = {r["step"]: r for r in (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())}
    missing = [s for s in range(1, step + 1) if s not in rows]
    if missing:
        raise RuntimeError(f"{metrics}: no step time for steps {missing[:3]}...")
    return (sum(rows[s]["step_time_s"] for s in range(1, step + 1)),
            sum(rows[s]["step_cpu_s"] for s in range(1, step + 1)))


def evaluate(args: list, out_json: Path, log: Path, threads: int) -> None:
    """`python -m clpdd_fast.evaluate ARGS --json OUT_JSON --seeds SEEDS` (the protocol, SEEDS probe seeds)."""
    child([PY, "-m", "clpdd_fast.evaluate", *args, "--json", str(out_json.relative_to(ROOT)), "--seeds", str(SEEDS)],
          log, threads)


def do_run(r: Run, root: Path, threads: int) -> None:
    folder = root / r.name
    run_dir = folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    for n in r.stages:
        stage = folder / f"step-{n}"
        if (stage / "eval.json").exists():
            continue
        if not (stage / "distilled.pt").exists():
            cmd = [PY, "-m", "clpdd_fast.distill", "--ipc", str(r.ipc), *r.args, "--seed", str(r.seed),
                   "--iterations", str(n), "--out", str(run_dir.relative_to(ROOT))]
            if (run_dir / "checkpoint.pt").exists():
                cmd.append("--resume")
            say(f"{r.name}: distill to step {n}")
            wall, rss = child(cmd, log, threads)
            stage.mkdir(exist_ok=True)
            step_wall, step_cpu = step_seconds(run_dir / "metrics.jsonl", n)
            info = {"step": n, "step_wall_seconds": step_wall, "step_cpu_seconds": step_cpu, "stage_wall_s": wall,
                    "peak_rss_mib": rss, "command": command(cmd)}
            shutil.copy2(run_dir / "distilled.pt", stage / "distilled.pt.tmp")
            os.replace(stage / "distilled.pt.tmp", stage / "distilled.pt")
            (stage / "stage.json").write_text(json.dumps(info, indent=2))
        say(f"{r.name}: evaluate step {n}")
        evaluate(["--distilled", str(stage.relative_to(ROOT))], stage / "eval.json", log, threads)
        top1 = json.loads((stage / "eval.json").read_text())["top1_mean"]
        say(f"{r.name}: step {n}: top-1 {100 * top1:.2f} %")


def do_baseline(ipc: int, baseline: str, root: Path, threads: int) -> None:
    folder = root / f"ipc{ipc}-{baseline}"
    out = folder / "eval.json"
    if out.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    say(f"baseline {baseline} ipc {ipc}")
    evaluate(["--baseline", baseline, "--ipc", str(ipc)], out, folder / "log.txt", threads)


def do_literal(folder: str, args: tuple, root: Path, threads: int) -> None:
    out = root / folder / "eval-literal.json"
    if out.exists():
        return
    if not (root / folder / "eval.json").exists():
        raise RuntimeError(f"literal protocol of {folder}: its pooled evaluation (eval.json) is not there yet")
    say(f"literal protocol: {folder}")
    evaluate([*args, "--aug-draws", "0"], out, root / folder / "log-literal.txt", threads)


def do_cross(source: str, root: Path, threads: int) -> None:
    """Distill with `source` (default recipe, seed 0), then evaluate the set with every encoder of ENCODERS."""
    folder = root / "cross" / source
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    if not (folder / "run" / "distilled.pt").exists():
        say(f"cross: distill with {source}")
        child([PY, "-m", "clpdd_fast.distill", "--model", source, "--out", str((folder / "run").relative_to(ROOT))]
              + (["--resume"] if (folder / "run" / "checkpoint.pt").exists() else []), log, threads)
    for target in ENCODERS:
        out = folder / f"eval-{target}.json"
        if not out.exists():
            say(f"cross: {source} -> {target}")
            evaluate(["--distilled", str((folder / "run").relative_to(ROOT)), "--eval-model", target,
                      "--eval-weights", "default"], out, log, threads)
        centroids = root / "cross" / f"centroids-{target}.json"
        if not centroids.exists():
            evaluate(["--baseline", "centroids", "--model", target], centroids, log, threads)


def measure(root: Path, jobs: int, threads: int, only: set | None) -> None:
    tasks = [(do_baseline, (ipc, b, root, threads)) for ipc, b in BASELINES if not only or f"ipc{ipc}-{b}" in only]
    runs = [(do_run, (r, root, threads)) for r in RUNS if not only or r.name in only or r.row in only]
    literal = [(do_literal, (folder, args, root, threads)) for name, folder, args in LITERAL
               if not only or "literal" in only]
    cross = [(do_cross, (source, root, threads)) for source in ENCODERS if not only or "cross" in only]
    # the two ipc = 1 seed-0 curves, then the literal-protocol and cross-encoder rows, then the rest in RUNS's order
    tasks += runs[:2] + literal + cross + runs[2:]

    def guarded(fn, args):
        try:
            fn(*args)
        except Exception as e:  # one failed run must not stop the others; it is reported and left unfinished
            say(f"FAILED: {e}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fn, args in tasks:
            pool.submit(guarded, fn, args)


# ---------------------------------------------------------------------------------------------------------- report
def collect(root: Path) -> dict:
    """{(ipc, row): {step: {"seconds": [...], "top1": [...], "probe_std": [...], "rss": [...], "seeds": [...]}}},
    and the baselines {(ipc, name): eval dict}."""
    curves: dict = {}
    for r in RUNS:
        for n in r.stages:
            stage = root / r.name / f"step-{n}"
            if not (stage / "eval.json").exists():
                continue
            ev = json.loads((stage / "eval.json").read_text())
            info = json.loads((stage / "stage.json").read_text())
            pt = curves.setdefault((r.ipc, r.row), {}).setdefault(n, {"seconds": [], "cpu": [], "top1": [],
                                                                        "probe_std": [], "rss": [], "seeds": []})
            pt["seconds"].append(info["step_wall_seconds"])
            pt["cpu"].append(info["step_cpu_seconds"])
            pt["top1"].append(100 * ev["top1_mean"])
            pt["probe_std"].append(100 * ev["top1_std"])
            pt["rss"].append(info["peak_rss_mib"])
            pt["seeds"].append(r.seed)
    baselines = {}
    for ipc, b in BASELINES:
        path = root / f"ipc{ipc}-{b}" / "eval.json"
        if path.exists():
            baselines[(ipc, b)] = json.loads(path.read_text())
    literal = {}
    for name, folder, _ in LITERAL:
        pooled, fresh = root / folder / "eval.json", root / folder / "eval-literal.json"
        if pooled.exists() and fresh.exists():
            literal[name] = (json.loads(pooled.read_text()), json.loads(fresh.read_text()))
    cross = {}
    for source in ENCODERS:
        for target in ENCODERS:
            path = root / "cross" / source / f"eval-{target}.json"
            if path.exists():
                cross[(source, target)] = json.loads(path.read_text())
    centroids = {t: json.loads((root / "cross" / f"centroids-{t}.json").read_text()) for t in ENCODERS
                 if (root / "cross" / f"centroids-{t}.json").exists()}
    return {"curves": curves, "baselines": baselines, "literal": literal, "cross": cross, "centroids": centroids}


def mean_std(values: list) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def at_time(curve: dict, seconds: float) -> tuple[int, float] | None:
    """The latest stage (step, mean top-1 over seeds) a curve had finished within `seconds` of steps (the median over
    seeds: one seed whose steps shared the machine with other work does not move it)."""
    done = [(n, mean_std(p["top1"])[0]) for n, p in sorted(curve.items())
            if median(p["seconds"]) <= seconds * 1.0001]
    return done[-1] if done else None


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipcs = sorted({ipc for ipc, _ in data["curves"]})
    fig, axes = plt.subplots(len(ipcs), 2, figsize=(11, 4.2 * len(ipcs)), squeeze=False)
    for i, ipc in enumerate(ipcs):
        for j, axis in enumerate(("steps", "seconds")):
            ax = axes[i][j]
            for (c_ipc, row), curve in sorted(data["curves"].items()):
                if c_ipc != ipc or row not in PLOT_ROWS:
                    continue
                pts = sorted(curve.items())
                xs = [max(n, 1) if axis == "steps" else max(median(p["seconds"]), 0.1) for n, p in pts]
                ms = [mean_std(p["top1"]) for _, p in pts]
                seeds = max(len(p["top1"]) for _, p in pts)
                ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                            linestyle="-" if row.startswith("clpdd") else "--", label=f"{row} ({seeds} seed(s))")
            for b, style in (("centroids", ":"), ("random", "-.")):
                ev = data["baselines"].get((ipc, b))
                if ev:
                    ax.axhline(100 * ev["top1_mean"], color="grey", linestyle=style, linewidth=1, label=b)
            ax.set_xscale("log")
            ax.set_xlabel("outer steps (step 0 at 1)" if axis == "steps" else
                          "wall seconds of steps (step 0 at 0.1 s)")
            ax.set_ylabel("protocol top-1 % (mean ± std over distillation seeds)")
            ax.set_title(f"Fashion-MNIST, EfficientNet-Lite0, ipc = {ipc}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(root: Path, md: Path, png: Path, machine: str) -> None:
    data = collect(root)
    if not data["curves"]:
        say("nothing measured yet")
        return
    try:
        plot(data, png)
    except ImportError:
        say("matplotlib is not installed (pip install -e '.[bench]'): no plot, the table only")
    lines = ["<!-- fidelity schedule begin -->", f"### Schedule study ({machine})", "",
             f"![protocol top-1 against steps and seconds]({png.name})", "",
             "| ipc | row | step | seconds of steps (wall / CPU, median over seeds) | distill seeds | protocol top-1 % (mean ± std over "
             "distillation seeds) | per seed (each: mean of 5 probe seeds) | probe std (mean) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (ipc, row), curve in sorted(data["curves"].items()):
        for n, p in sorted(curve.items()):
            m, s = mean_std(p["top1"])
            lines.append(f"| {ipc} | {row} | {n} | {median(p['seconds']):.0f} / {median(p['cpu']):.0f} | {','.join(map(str, p['seeds']))} "
                         f"| {m:.2f} ± {s:.2f} | {' / '.join(f'{v:.2f}' for v in p['top1'])} | "
                         f"{mean_std(p['probe_std'])[0]:.2f} | {max(p['rss']):.0f} |")
    for (ipc, b), ev in sorted(data["baselines"].items()):
        lines.append(f"| {ipc} | {b} (baseline) | – | – | – | {100 * ev['top1_mean']:.2f} ± {100 * ev['top1_std']:.2f} "
                     f"(probe / draw seeds) | – | – | – |")
    lines += ["", "Equal time, pixel parameterisation, top-1 means and seconds medians over distillation seeds. Each row takes one method's "
              "evaluated stage and, for the other method, the latest stage it had finished within the same seconds of "
              "steps (so the looked-up method may have been a little further than its row says):", "",
              "| ipc | at the stage of | its step | seconds | CLP-DD row | CLP-DD: step reached | CLP-DD top-1 % | "
              "LGM row | LGM: step reached | LGM top-1 % | CLP-DD - LGM |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ipc, row), curve in sorted(data["curves"].items()):
        if row not in EQUAL_TIME_ROWS:
            continue
        for (l_ipc, l_row), l_curve in sorted(data["curves"].items()):
            if l_ipc != ipc or not (l_row.startswith("lgm") and l_row.endswith("pixel")):
                continue
            for anchor, own, other in (("CLP-DD", curve, l_curve), ("LGM", l_curve, curve)):
                for n, p in sorted(own.items()):
                    if n == 0:
                        continue
                    t = median(p["seconds"])
                    hit = at_time(other, t)
                    if hit is None:
                        continue
                    mine = (n, mean_std(p["top1"])[0])
                    c, g = (mine, hit) if anchor == "CLP-DD" else (hit, mine)
                    lines.append(f"| {ipc} | {anchor} | {n} | {t:.0f} | {row} | {c[0]} | {c[1]:.2f} | {l_row} | "
                                 f"{g[0]} | {g[1]:.2f} | {c[1] - g[1]:+.2f} |")
    if data["literal"]:
        lines += ["", "Cached draws against the literal protocol (the same images, 5 probe seeds each; `evaluate` "
                  "with the default `--aug-draws 32` and with `--aug-draws 0`):", "",
                  "| images | 32 cached draws: top-1 % | fresh draws every epoch: top-1 % | difference | "
                  "seconds (cached / fresh) |", "|---|---|---|---|---|"]
        for name, (pooled, fresh) in data["literal"].items():
            lines.append(f"| {name} | {100 * pooled['top1_mean']:.2f} ± {100 * pooled['top1_std']:.2f} | "
                         f"{100 * fresh['top1_mean']:.2f} ± {100 * fresh['top1_std']:.2f} | "
                         f"{100 * (pooled['top1_mean'] - fresh['top1_mean']):+.2f} | "
                         f"{pooled['seconds']:.0f} / {fresh['seconds']:.0f} |")
    if data["cross"]:
        short = {e: e.replace("tf_efficientnet_", "") for e in ENCODERS}
        lines += ["", "Cross-encoder transfer (ipc = 1, the default recipe: 200 steps, seed 0; each set distilled with "
                  "the row's encoder, evaluated with the column's; `distill --model ROW --out D` then `evaluate "
                  "--distilled D --eval-model COLUMN --eval-weights default --seeds 5`):", "",
                  "| distilled with (row), evaluated with (column) | " + " | ".join(short[t] for t in ENCODERS) + " |",
                  "|---|" + "---|" * len(ENCODERS)]
        for source in ENCODERS:
            cells = [f"{100 * data['cross'][(source, t)]['top1_mean']:.2f} ± "
                     f"{100 * data['cross'][(source, t)]['top1_std']:.2f}" if (source, t) in data["cross"] else "–"
                     for t in ENCODERS]
            lines.append(f"| {short[source]} | " + " | ".join(cells) + " |")
        lines.append("| centroids (real images) | " + " | ".join(
            f"{100 * data['centroids'][t]['top1_mean']:.2f} ± {100 * data['centroids'][t]['top1_std']:.2f}"
            if t in data["centroids"] else "–" for t in ENCODERS) + " |")
    lines.append("<!-- fidelity schedule end -->")
    block = "\n".join(lines) + "\n"
    text = md.read_text()
    start, end = "<!-- fidelity schedule begin -->", "<!-- fidelity schedule end -->\n"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    md.write_text(text)
    (root / "summary.json").write_text(json.dumps(
        {f"ipc{ipc}/{row}": {str(n): p for n, p in curve.items()} for (ipc, row), curve in data["curves"].items()},
        indent=1))
    say(f"report written to {md} and {png}")


def main(args) -> int:
    root = ROOT / args.out / "schedule"
    root.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        measure(root, args.jobs, args.threads, set(args.only.split(",")) if args.only else None)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    machine = (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} CPUs, {args.jobs} run(s) at a time with "
               f"{args.threads} thread(s) each, torch CPU")
    report(root, Path(args.report), HERE / "fidelity_schedule.png", machine)
    return 0


if __name__ == "__main__":
    sys.exit(print("run it as: python benchmarks/fidelity.py --schedule") or 2)
