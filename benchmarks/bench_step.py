"""Time and peak memory of one outer distillation step against the number of synthetic images m and real features N.

Each configuration runs in its own subprocess (so the CPU's peak RSS belongs to it alone) and is measured twice in
the same run: the bounded-memory step (`clpdd_step`: encoder forward without autograd, ridge + CE, re-forward chunk
by chunk) and, as the baseline, the same loss through one plain autograd graph over all m images (`--no-plain` skips
it; it is skipped by itself where it would not fit). Rows go to benchmarks/RESULTS.md with date, device, commit, command.

    python3 benchmarks/bench_step.py                      # CPU here: Lite0 (random weights) at 64 px, m and N swept
    python3 benchmarks/bench_step.py --imagenet           # GPU: ViT-B/14 at 224 px, m = 1000, N = 1,281,167, d = 768
    python3 benchmarks/bench_step.py --m 10,100 --n 5000 --reps 2 --no-append
    python3 benchmarks/bench_step.py --method clpdd,lgm --m 10,40 --n 5000   # both methods in one run

Memory: on CUDA the peak allocated during the step beyond what was allocated before it; on CPU the peak resident
set sampled every millisecond from /proc/self/statm during the timed steps, minus the resident set before them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RssSampler, Table, device_name, results_header  # noqa: E402

from clpdd_fast.cli import add_old_flag, device_arg, positive_int  # noqa: E402
from clpdd_fast.config import DEFAULT_MODEL  # noqa: E402

IMAGENET = dict(model="vit_base_patch14_dinov2", image_size=224, synthetic_size=256, m=[1000], n=[1_281_167],
                classes=1000, encoder_batch=50, encoder_dtype="bf16", augment="standard")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--imagenet", action="store_true", help="the ImageNet-1K shape of the issue (needs a GPU)")
    p.add_argument("--method", default="clpdd", help="comma list of methods (clpdd, lgm); ratios are to clpdd's step")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model, random weights")
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--synthetic-size", type=int, default=None)
    p.add_argument("--m", default="10,40,160", help="comma list of synthetic-image counts")
    p.add_argument("--n", default="5000,60000", help="comma list of real-feature counts")
    p.add_argument("--classes", type=positive_int, default=10)
    add_old_flag(p, "--chunk-size", p.add_argument("--encoder-batch", type=positive_int, default=16,
                                                   help="synthetic images per encoder pass"))
    add_old_flag(p, "--precision", p.add_argument("--encoder-dtype", default="fp32", choices=["fp32", "bf16"],
                                                  help="encoder passes and real features (as distill's)"))
    p.add_argument("--augment", default="standard")
    p.add_argument("--reps", type=positive_int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--augs-per-batch", type=positive_int, default=None,
                   help="--method lgm: augmented copies K per step (default 10; 3 with --imagenet, as LGM's authors)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-plain", action="store_true", help="skip the one-graph baseline")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration (JSON)
    args = p.parse_args(argv)
    if args.imagenet:
        for k, v in IMAGENET.items():
            setattr(args, k, ",".join(map(str, v)) if isinstance(v, list) else v)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.augs_per_batch is None:
        args.augs_per_batch = 3 if args.imagenet else 10
    return args


def measure(cfg: dict) -> dict:
    """Build one configuration and time `cfg['variant']` ('step' or 'plain') over cfg['reps'] steps."""
    from clpdd_fast.augment import build_augment
    from clpdd_fast.encoders import build_encoder
    from clpdd_fast.feature_transform import FeatureTransform
    from clpdd_fast.methods import METHODS, ClpddInputs, LgmInputs, StepInputs, clpdd_loss_plain
    from clpdd_fast.synthetic import build_synthetic

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg["model"], "none", device, image_size=cfg["image_size"])  # random weights
    m, n, c = cfg["m"], cfg["n"], cfg["classes"]
    real_dtype = torch.bfloat16 if cfg["encoder_dtype"] == "bf16" else torch.float32
    real = torch.randn(n, encoder.feature_dim, device=device, dtype=real_dtype)
    labels = torch.arange(m, device=device) % c
    size = cfg["synthetic_size"] or cfg["image_size"]
    synthetic = build_synthetic("pixel", labels, size, None).to(device)
    clpdd = ClpddInputs(real_features=real, real_labels=torch.arange(n, device=device) % c,
                        transform=FeatureTransform.fit("raw", real[:1]), lam=1.0, tau=0.1)
    # LGM reads a fresh real batch of K * m images every step (no feature cache); random pixels suffice for timing.
    lgm = LgmInputs(real_images=lambda k, gen: (torch.rand(k, 3, size, size, device=device),
                                                torch.randint(c, (k,), device=device)),
                    augs_per_batch=cfg["augs_per_batch"])
    inputs = StepInputs(encoder=encoder, augment=build_augment(cfg["augment"]), image_size=cfg["image_size"],
                        num_classes=c, encoder_batch=cfg["encoder_batch"],
                        autocast_dtype=torch.bfloat16 if cfg["encoder_dtype"] == "bf16" else None, clpdd=clpdd, lgm=lgm)
    generator = torch.Generator().manual_seed(0)
    if cfg["variant"] == "plain":
        step = lambda: clpdd_loss_plain(synthetic, inputs, generator).backward()
    else:
        step = lambda: METHODS[cfg["method"]](synthetic, inputs, generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    synthetic.zero_grad(set_to_none=True)
    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with RssSampler() as rss:
        for _ in range(cfg["reps"]):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
            synthetic.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = rss.peak - rss.base
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "peak_mib": peak}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    if args.imagenet and not args.device.startswith("cuda"):
        print("bench_step --imagenet needs a CUDA GPU", file=sys.stderr)
        return 2
    command = "python3 benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = (device_name(args.device) if args.device.startswith("cuda")
             else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    table = Table(None if args.no_append else args.results,
                  results_header("bench_step", where, command),
                  ["method", "model @ px", "m", "N real", "encoder batch", "variant", "median s/step", "peak extra MiB",
                   "time / clpdd step", "memory / clpdd step"])
    runs = [(method, "step") for method in args.method.split(",")]
    if "clpdd" in args.method.split(",") and not args.no_plain:
        runs.insert(1, ("clpdd", "plain"))  # the same loss through one autograd graph: no bounded memory
    for m in map(int, args.m.split(",")):
        for n in map(int, args.n.split(",")):
            got = {}
            for method, variant in runs:
                cfg = dict(vars(args), m=m, n=n, method=method, variant=variant)
                cfg.pop("one")
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                                      text=True)
                label = f"lgm (K={args.augs_per_batch})" if method == "lgm" else method
                cells = [label, f"{args.model} @ {args.image_size}", m, n, args.encoder_batch, variant]
                if proc.returncode != 0:
                    reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                    table.row(*cells, "-", "-", "-", f"failed: {reason[:80]}")
                    continue
                r = got[(method, variant)] = json.loads(proc.stdout.strip().splitlines()[-1])
                base = got.get(("clpdd", "step"))
                ratio_t = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
                ratio_m = f"{r['peak_mib'] / max(base['peak_mib'], 1.0):.2f}" if base else "-"
                table.row(*cells, f"{r['median_s']:.3f}", f"{r['peak_mib']:.0f}", ratio_t, ratio_m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
