"""`python -m clpdd_fast.evaluate`: the linear-probe evaluation protocol (LGM's), baselines and cross-model evaluation.

Evaluate a distilled set:   python -m clpdd_fast.evaluate --distilled runs/<run>            (folder or distilled.pt)
Cross-model:                python -m clpdd_fast.evaluate --distilled runs/<run> --eval-model NAME --eval-weights W
Baselines (no distilled set needed; embedded default = Fashion-MNIST + EfficientNet-Lite0):
                            python -m clpdd_fast.evaluate --baseline random|centroids|full [--ipc N]

A fresh linear head (std 0.01 init, zero bias) is trained on the frozen encoder's features of the images with flip +
random-resized-crop augmentation, Adam lr 1e-3 * B / 256 (B = min(100, n)), no weight decay, cosine schedule over
--epochs; top-1 / top-5 on the real test split, mean +- std (ddof 0) over --seeds seeds. The features of --aug-draws
augmentation draws per image are computed once and reused across epochs (clpdd_fast/probe_protocol.py says why).
The real test (and training) features come from the distillation's feature cache: same encoder, resolution, subset.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from clpdd_fast import artifacts
from clpdd_fast.augment import build_augment
from clpdd_fast.cli import (DEFAULT_CACHE, DEFAULT_LAM, HelpFormatter, default_image_size, device_arg,
                            fixed_subset, int_or_all, positive_int, run_main, subset_size)
from clpdd_fast.baselines import BASELINES, centroid_indices, random_real_indices
from clpdd_fast.datasets import open_dataset
from clpdd_fast.feature_cache import load_or_extract_features
from clpdd_fast.encoders import build_encoder, encode_images
from clpdd_fast.probe_protocol import augmented_features, summarize, train_linear_probe
from clpdd_fast.feature_transform import FEATURE_NORMS, FeatureTransform
from clpdd_fast.ridge_probe import ridge_probe_accuracy

DEFAULT_EPOCHS = 1000
DEFAULT_FULL_EPOCHS = 100  # full real data: n / B = 50x more steps per epoch than a 1-ipc set (see --help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clpdd_fast.evaluate", description=__doc__,
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--distilled", default=None, help="a distillation run folder or its distilled.pt")
    a("--baseline", default=None, choices=BASELINES,
      help="evaluate a baseline instead: random real images (ipc per class, redrawn per seed), centroids (the real "
           "image nearest each class-mean feature), full (probe on all real training features, the ceiling)")
    a("--ipc", type=positive_int, default=1, help="images per class of the random / centroids baselines (default 1)")
    a("--data", default=None, help="dataset (default: the distillation's; for baselines the embedded Fashion-MNIST)")
    a("--skip-bad-images", action="store_true", default=None,
      help="leave out images whose files cannot be decoded (each is named in a warning) instead of stopping "
           "(default: the distillation's setting, else off)")
    a("--model", default="tf_efficientnet_lite0", help="baselines: encoder (default tf_efficientnet_lite0)")
    a("--weights", default="default", help="baselines: encoder weights (default, timm, none, or a file)")
    a("--eval-model", default=None, help="evaluate with another encoder (cross-model); default: the distillation's")
    a("--eval-weights", default=None,
      help="weights of --eval-model (default: the distillation's if the model is the same, else 'default')")
    a("--image-size", type=positive_int, default=None,
      help="encoder input resolution (default: the distillation's; else 64 for IDX data, the model's own otherwise)")
    a("--train-subset", type=int_or_all, default=None, metavar="N|all",
      help="real training rows (default: the distillation's; embedded default: 5000)")
    a("--test-subset", type=int_or_all, default=None, metavar="N|all",
      help="real test rows (default: the distillation's; embedded default: 5000)")
    a("--epochs", type=positive_int, default=None,
      help=f"training epochs of the linear head (default {DEFAULT_EPOCHS}; {DEFAULT_FULL_EPOCHS} for --baseline "
           "full, whose epochs are n/B times longer)")
    a("--seeds", type=positive_int, default=5, help="number of seeds (0 .. N-1) (default 5)")
    a("--aug-draws", type=positive_int, default=32,
      help="augmentation draws per image whose features are cached and reused across epochs (default 32)")
    a("--augment", default="flip_crop", choices=["flip_crop", "none"],
      help="training augmentation of the probe (default flip_crop, the protocol; none: plain resize)")
    a("--pool-seed", type=int, default=0, help="seed of the augmentation-draw pool (default 0)")
    a("--lam", type=float, default=None, help="ridge strength of the extra ridge-probe number (default: the "
      "distillation's, else 0.1)")
    a("--features", default=None, choices=FEATURE_NORMS,
      help="feature normalisation of the extra ridge-probe number (default: the distillation's, else center-l2)")
    a("--cache-dir", default=None, help=f"real-feature cache (default: the distillation's, else {DEFAULT_CACHE})")
    a("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    a("--json", default=None, metavar="PATH", help="write the results (top1_mean, top1_std, top1_per_seed, top5_*)")
    return p


def _load_distilled(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "distilled.pt"
    if not p.is_file():
        raise SystemExit(f"error: --distilled: {path!r} is neither a distilled.pt file nor a run folder holding one")
    payload = artifacts.load_torch(p, "--distilled", {"images", "labels", "config"})  # runs no code from the file
    images, labels = payload["images"], payload["labels"]
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) \
            or not isinstance(payload["config"], dict):
        raise ValueError(f"--distilled: {p}: expected images and labels tensors and a config dict, got "
                         f"{type(images).__name__}, {type(labels).__name__}, {type(payload['config']).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise SystemExit(f"error: --distilled: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         f"do not form a set of (m, 3, S, S) images with m labels")
    payload["path"] = str(p)
    return payload


def _check_classes(train, cfg: dict, labels: torch.Tensor | None) -> None:
    """The distilled set's classes must be the evaluation data's classes."""
    if cfg.get("num_classes") is not None and int(cfg["num_classes"]) != train.num_classes:
        raise SystemExit(f"error: the distilled set has {cfg['num_classes']} classes, the evaluation data "
                         f"{train.num_classes} ({train.root}); evaluate on the data it was distilled from")
    names = cfg.get("class_names")
    if names is not None and list(names) != list(train.class_names):
        raise SystemExit(f"error: the distilled set's class names {list(names)[:5]}... differ from the evaluation "
                         f"data's {list(train.class_names)[:5]}...")
    if labels is not None and labels.numel() and int(labels.max()) >= train.num_classes:
        raise SystemExit(f"error: the distilled set has label {int(labels.max())}, but the evaluation data has only "
                         f"{train.num_classes} classes")


def run(args: argparse.Namespace) -> dict:
    if (args.distilled is None) == (args.baseline is None):
        raise SystemExit("error: pass exactly one of --distilled PATH (evaluate a distilled set) or "
                         "--baseline random|centroids|full")
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    payload = _load_distilled(args.distilled) if args.distilled else None
    cfg = dict(payload["config"]) if payload else {}
    data = args.data if args.data is not None else cfg.get("data")
    model = cfg.get("model", args.model) if payload else args.model
    weights = cfg.get("weights", args.weights) if payload else args.weights
    eval_model = args.eval_model or model
    eval_weights = args.eval_weights or (weights if eval_model == model else "default")
    cross = eval_model != model or eval_weights != weights

    train, test = open_dataset(data, "train"), open_dataset(data, "test")
    if payload:
        _check_classes(train, cfg, payload["labels"])
    if test.num_classes != train.num_classes:
        raise SystemExit(f"error: train split has {train.num_classes} classes, test split {test.num_classes}")
    num_classes = train.num_classes
    requested_size = args.image_size or (cfg.get("image_size") if payload and not cross else None)
    encoder = build_encoder(eval_model, eval_weights, device, image_size=requested_size)
    image_size = requested_size or default_image_size(train, encoder)
    embedded = data is None

    def rows_used(flag, key):  # the distillation's subsets unless asked otherwise
        if flag is None and payload and key in cfg:
            return subset_size(cfg[key], cfg.get("data") is None)
        return subset_size(flag, embedded)

    train_k, test_k = rows_used(args.train_subset, "train_subset"), rows_used(args.test_subset, "test_subset")
    store_dtype = torch.bfloat16 if cfg.get("precision") == "bf16" else torch.float16
    cache_dir = args.cache_dir or cfg.get("cache_dir") or str(DEFAULT_CACHE)
    skip_bad = bool(args.skip_bad_images or cfg.get("skip_bad_images"))

    def features(dataset, k):  # -> features, labels and the dataset rows they belong to (bad images left out)
        return load_or_extract_features(encoder, dataset, image_size, cache_dir, dtype=store_dtype, device=device,
                                        indices=fixed_subset(len(dataset), k), skip_bad_images=skip_bad,
                                        return_rows=True)

    print(f"[evaluate] {eval_model} ({eval_weights}) at {image_size}px, cache {cache_dir}", file=sys.stderr)
    phi_train, y_train, train_rows = features(train, train_k)
    phi_test, y_test, _ = features(test, test_k)
    lam = args.lam if args.lam is not None else float(cfg.get("lam", DEFAULT_LAM))
    transform = FeatureTransform.fit(args.features or cfg.get("features", "center-l2"), phi_train)
    augment = build_augment(args.augment)
    draws = args.aug_draws if args.augment != "none" else 1
    seeds = list(range(args.seeds))
    epochs = args.epochs or (DEFAULT_FULL_EPOCHS if args.baseline == "full" else DEFAULT_EPOCHS)

    def evaluate_images(images, labels, seed_list, pool_seed):
        pool = augmented_features(encoder, images, augment, draws, image_size,
                                  torch.Generator().manual_seed(pool_seed), device=device)
        per_seed = train_linear_probe(pool, labels, phi_test, y_test, num_classes, epochs=epochs, seeds=seed_list)
        plain = encode_images(encoder, images, image_size)  # un-augmented, as distill's ridge number
        ridge = ridge_probe_accuracy(plain, labels, phi_test, y_test, lam, num_classes, transform)
        return per_seed, ridge

    def dataset_images(rows):
        return train.images(train_rows[rows.numpy()], image_size)

    selected = None
    if payload:
        per_seed, ridge = evaluate_images(payload["images"], payload["labels"].long(), seeds, args.pool_seed)
        ridges = [ridge]
        what = f"distilled set {payload['path']} ({len(payload['labels'])} images)"
    elif args.baseline == "random":
        per_seed, ridges, selected = [], [], []
        for s in seeds:  # a new random draw of real images per seed; its augmentation pool is seeded alike
            rows = random_real_indices(y_train, num_classes, args.ipc, s)
            res, ridge = evaluate_images(dataset_images(rows), y_train[rows], [s], s)
            per_seed += res
            ridges.append(ridge)
            selected.append(rows.tolist())
        what = f"random real images ({args.ipc} per class, redrawn per seed)"
    elif args.baseline == "centroids":
        rows = centroid_indices(phi_train, y_train, num_classes, args.ipc)
        per_seed, ridge = evaluate_images(dataset_images(rows), y_train[rows], seeds, args.pool_seed)
        ridges, selected = [ridge], rows.tolist()
        what = f"centroids ({args.ipc} per class)"
    else:
        # The ceiling: all real training features, centre view from the cache (no augmentation pool: one draw).
        per_seed = train_linear_probe(phi_train, y_train, phi_test, y_test, num_classes, epochs=epochs, seeds=seeds)
        ridges = [ridge_probe_accuracy(phi_train, y_train, phi_test, y_test, lam, num_classes, transform)]
        what = f"full real training set ({len(y_train)} images, cached un-augmented features)"
        draws = None

    results = summarize(per_seed) | {
        "ridge_top1_mean": sum(ridges) / len(ridges), "ridge_top1_per_seed": ridges, "ridge_lam": lam,
        "evaluated": what, "distilled": payload["path"] if payload else None, "baseline": args.baseline,
        "ipc": args.ipc if args.baseline else cfg.get("ipc"), "eval_model": eval_model, "eval_weights": eval_weights,
        "distill_model": model if payload else None, "image_size": image_size, "epochs": epochs,
        "aug_draws": draws, "augment": args.augment if draws else "none (cached features)", "num_test": len(y_test), "num_train": len(y_train),
        "selected_rows": selected, "seconds": time.perf_counter() - t_start,
    }
    print(f"\nLinear-probe protocol ({epochs} epochs, {results['augment']}, {draws} draws/image) on {len(y_test)} real "
          f"test images, {eval_model}{' (cross-model)' if cross else ''}:\n  {what}\n"
          f"  top-1 {100 * results['top1_mean']:.2f} +- {100 * results['top1_std']:.2f} %   "
          f"top-5 {100 * results['top5_mean']:.2f} +- {100 * results['top5_std']:.2f} %   ({len(seeds)} seeds)\n"
          f"  ridge probe (lam={lam:g}): {100 * results['ridge_top1_mean']:.2f} %   "
          f"[{results['seconds']:.0f}s]")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.save_json(results, path)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
