"""`python -m clpdd_fast.evaluate`: the linear-probe evaluation protocol (LGM's), baselines and cross-model evaluation.

Evaluate a distilled set:   python -m clpdd_fast.evaluate --distilled runs/<run>            (folder or distilled.pt)
Cross-model:                python -m clpdd_fast.evaluate --distilled runs/<run> --eval-model NAME --eval-weights W
Baselines (no distilled set needed; embedded default = Fashion-MNIST + EfficientNet-Lite0):
                            python -m clpdd_fast.evaluate --baseline random|centroids|full [--ipc N]

A fresh linear head (std 0.01 init, zero bias) is trained on the frozen encoder's features of the images with flip +
random-resized-crop augmentation, Adam lr 1e-3 * B / 256 (B = min(100, n)), no weight decay, cosine schedule over
--epochs; top-1 / top-5 on the real test split, mean +- std (ddof 0) over --seeds seeds. The features of --aug-draws
augmentation draws per image are computed once and reused across epochs (clpdd_fast/probe_protocol.py says why);
--aug-draws 0 runs the literal protocol instead: every image augmented afresh and encoded again in every epoch.
The real test (and training) features come from the distillation's feature cache: same encoder, resolution, subset.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clpdd_fast import artifacts
from clpdd_fast import validation as check
from clpdd_fast.augment import Augment, build_augment
from clpdd_fast.baselines import BASELINES, centroid_indices, random_real_indices
from clpdd_fast.cli import HelpFormatter, device_arg, int_or_all, nonnegative_int, positive_int, run_main
from clpdd_fast.config import DEFAULT_CACHE, DEFAULT_LAM, DEFAULT_MODEL, RunConfig
from clpdd_fast.encoders import encode_images
from clpdd_fast.experiment import Experiment, open_experiment, subset_size
from clpdd_fast.feature_transform import FEATURE_NORMS, FeatureTransform
from clpdd_fast.probe_protocol import augmented_features, summarize, train_linear_probe, train_linear_probe_fresh
from clpdd_fast.ridge_probe import ridge_probe_accuracy

DEFAULT_EPOCHS = 1000
DEFAULT_FULL_EPOCHS = 100  # full real data: n / B = 50x more steps per epoch than a 1-ipc set (see --help)


@dataclass
class EvalConfig:
    """`evaluate`'s settings, as its command line sets them (its parser reads the defaults from here). None: the
    distilled set's setting (its RunConfig), else the default --help names."""
    distilled: str | None = None        # a run folder or its distilled.pt; or
    baseline: str | None = None         # one of BASELINES
    ipc: int = 1                        # the baselines' images per class
    data: str | None = None
    skip_bad_images: bool | None = None
    model: str = DEFAULT_MODEL          # the baselines' encoder
    weights: str = "default"
    eval_model: str | None = None       # another encoder for a distilled set (cross-model)
    eval_weights: str | None = None
    image_size: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    epochs: int | None = None           # DEFAULT_EPOCHS, or DEFAULT_FULL_EPOCHS for --baseline full
    seeds: int = 5
    aug_draws: int = 32
    augment: str = "flip_crop"
    pool_seed: int = 0
    lam: float | None = None
    features: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    json: str | None = None             # where to write the results



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clpdd_fast.evaluate", description=__doc__,
                                formatter_class=HelpFormatter)
    a = p.add_argument
    E = EvalConfig()
    a("--distilled", default=E.distilled, help="a distillation run folder or its distilled.pt")
    a("--baseline", default=E.baseline, choices=BASELINES,
      help="evaluate a baseline instead: random real images (ipc per class, redrawn per seed), centroids (the real "
           "image nearest each class-mean feature), full (probe on all real training features, the ceiling)")
    a("--ipc", type=positive_int, default=E.ipc,
      help="images per class of the random / centroids baselines (default 1)")
    a("--data", default=E.data, help="dataset (default: the distillation's; for baselines the embedded Fashion-MNIST)")
    a("--skip-bad-images", action="store_true", default=E.skip_bad_images,
      help="leave out images whose files cannot be decoded (each is named in a warning) instead of stopping "
           "(default: the distillation's setting, else off)")
    a("--model", default=E.model, help=f"baselines: encoder (default {DEFAULT_MODEL})")
    a("--weights", default=E.weights, help="baselines: encoder weights (default, timm, none, or a file)")
    a("--eval-model", default=E.eval_model,
      help="evaluate with another encoder (cross-model); default: the distillation's")
    a("--eval-weights", default=E.eval_weights,
      help="weights of --eval-model (default: the distillation's if the model is the same, else 'default')")
    a("--image-size", type=positive_int, default=E.image_size,
      help="encoder input resolution (default: the distillation's; else 64 for IDX data, the model's own otherwise)")
    a("--train-subset", type=int_or_all, default=E.train_subset, metavar="N|all",
      help="real training rows (default: the distillation's; embedded default: 5000)")
    a("--test-subset", type=int_or_all, default=E.test_subset, metavar="N|all",
      help="real test rows (default: the distillation's; embedded default: 5000)")
    a("--epochs", type=positive_int, default=E.epochs,
      help=f"training epochs of the linear head (default {DEFAULT_EPOCHS}; {DEFAULT_FULL_EPOCHS} for --baseline "
           "full, whose epochs are n/B times longer)")
    a("--seeds", type=positive_int, default=E.seeds, help="number of seeds (0 .. N-1) (default 5)")
    a("--aug-draws", type=nonnegative_int, default=E.aug_draws,
      help="augmentation draws per image whose features are cached and reused across epochs (default 32); 0: the "
           "literal protocol, a fresh draw of every image in every epoch, encoded again (epochs x seeds x images "
           "encoder forwards)")
    a("--augment", default=E.augment, choices=["flip_crop", "none"],
      help="training augmentation of the probe (default flip_crop, the protocol; none: plain resize)")
    a("--pool-seed", type=int, default=E.pool_seed, help="seed of the augmentation-draw pool (default 0)")
    a("--lam", type=float, default=E.lam, help="ridge strength of the extra ridge-probe number (default: the "
      f"distillation's, else {DEFAULT_LAM:g})")
    a("--features", default=E.features, choices=FEATURE_NORMS,
      help="feature normalisation of the extra ridge-probe number (default: the distillation's, else center-l2)")
    a("--cache-dir", default=E.cache_dir,
      help=f"real-feature cache (default: the distillation's, else {DEFAULT_CACHE})")
    a("--device", type=device_arg, default=E.device,
      help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    a("--json", default=E.json, metavar="PATH", help="write the results (top1_mean, top1_std, top1_per_seed, top5_*)")
    return p


def _check_classes(train, cfg: RunConfig, labels: torch.Tensor) -> None:
    """The distilled set's classes must be the evaluation data's classes."""
    if cfg.num_classes is not None and int(cfg.num_classes) != train.num_classes:
        raise SystemExit(f"error: the distilled set has {cfg.num_classes} classes, the evaluation data "
                         f"{train.num_classes} ({train.root}); evaluate on the data it was distilled from")
    names = cfg.class_names
    if names is not None and list(names) != list(train.class_names):
        raise SystemExit(f"error: the distilled set's class names {list(names)[:5]}... differ from the evaluation "
                         f"data's {list(train.class_names)[:5]}...")
    check.labels("--distilled: the distilled set's labels (the evaluation data's classes)", labels, train.num_classes)


@dataclass
class Protocol:
    """The evaluation settings every source of images shares, and the two probes run on a set of images."""
    exp: Experiment
    transform: FeatureTransform
    lam: float
    augment: Augment
    draws: int
    epochs: int
    seeds: list
    device: torch.device

    def evaluate_images(self, images: torch.Tensor, labels: torch.Tensor, seeds: list,
                        pool_seed: int) -> tuple[list, float]:
        """The trained-head protocol's per-seed results, and the ridge probe's top-1 on un-augmented features.
        draws == 0: the literal protocol (fresh draws every epoch from each probe seed; pool_seed is not used)."""
        exp = self.exp
        if self.draws == 0:
            per_seed = train_linear_probe_fresh(exp.encoder, images, self.augment, exp.image_size, labels,
                                                exp.phi_test, exp.y_test, exp.num_classes, epochs=self.epochs,
                                                seeds=seeds)
        else:
            pool = augmented_features(exp.encoder, images, self.augment, self.draws, exp.image_size,
                                      torch.Generator().manual_seed(pool_seed), device=self.device)
            per_seed = train_linear_probe(pool, labels, exp.phi_test, exp.y_test, exp.num_classes,
                                          epochs=self.epochs, seeds=seeds)
        plain = encode_images(exp.encoder, images, exp.image_size)  # un-augmented, as distill's ridge number
        ridge = ridge_probe_accuracy(plain, labels, exp.phi_test, exp.y_test, self.lam, exp.num_classes,
                                     self.transform)
        return per_seed, ridge

    def real_images(self, rows: torch.Tensor) -> torch.Tensor:
        """Real training images of positions `rows` in the training features."""
        return self.exp.train.images(self.exp.train_rows[rows.numpy()], self.exp.image_size)


# One function per source of images; each returns per_seed (the protocol's results), ridges (ridge-probe top-1s),
# what (a description) and selected (the real rows used, for baselines).
def _distilled(p: Protocol, payload: dict, pool_seed: int) -> dict:
    per_seed, ridge = p.evaluate_images(payload["images"], payload["labels"].long(), p.seeds, pool_seed)
    return {"per_seed": per_seed, "ridges": [ridge], "selected": None,
            "what": f"distilled set {payload['path']} ({len(payload['labels'])} images)"}


def _random_real(p: Protocol, ipc: int) -> dict:
    """A new random draw of real images per seed; its augmentation pool is seeded alike."""
    per_seed, ridges, selected = [], [], []
    for s in p.seeds:
        rows = random_real_indices(p.exp.y_train, p.exp.num_classes, ipc, s)
        res, ridge = p.evaluate_images(p.real_images(rows), p.exp.y_train[rows], [s], s)
        per_seed += res
        ridges.append(ridge)
        selected.append(rows.tolist())
    return {"per_seed": per_seed, "ridges": ridges, "selected": selected,
            "what": f"random real images ({ipc} per class, redrawn per seed)"}


def _centroids(p: Protocol, ipc: int, pool_seed: int) -> dict:
    rows = centroid_indices(p.exp.phi_train, p.exp.y_train, p.exp.num_classes, ipc)
    per_seed, ridge = p.evaluate_images(p.real_images(rows), p.exp.y_train[rows], p.seeds, pool_seed)
    return {"per_seed": per_seed, "ridges": [ridge], "selected": rows.tolist(), "what": f"centroids ({ipc} per class)"}


def _full_real(p: Protocol) -> dict:
    """The ceiling: all real training features, centre view from the cache (no augmentation pool: one draw)."""
    exp = p.exp
    per_seed = train_linear_probe(exp.phi_train, exp.y_train, exp.phi_test, exp.y_test, exp.num_classes,
                                  epochs=p.epochs, seeds=p.seeds)
    ridge = ridge_probe_accuracy(exp.phi_train, exp.y_train, exp.phi_test, exp.y_test, p.lam, exp.num_classes,
                                 p.transform)
    return {"per_seed": per_seed, "ridges": [ridge], "selected": None,
            "what": f"full real training set ({len(exp.y_train)} images, cached un-augmented features)"}


def run(cfg: EvalConfig) -> dict:
    if (cfg.distilled is None) == (cfg.baseline is None):
        raise SystemExit("error: pass exactly one of --distilled PATH (evaluate a distilled set) or "
                         "--baseline random|centroids|full")
    t_start = time.perf_counter()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    payload = artifacts.load_distilled(cfg.distilled) if cfg.distilled else None
    # the distillation's settings; for a baseline the defaults, with the encoder asked for
    source = RunConfig.from_dict(payload["config"], f"--distilled {payload['path']}") if payload else \
        RunConfig(model=cfg.model, weights=cfg.weights)
    eval_model = cfg.eval_model or source.model
    eval_weights = cfg.eval_weights or (source.weights if eval_model == source.model else "default")
    cross = eval_model != source.model or eval_weights != source.weights

    def subset(flag, distilled):  # the distillation's subsets unless asked otherwise
        return subset_size(distilled, source.data is None) if flag is None and payload else flag

    exp = open_experiment(
        cfg.data if cfg.data is not None else source.data, eval_model, eval_weights, device,
        image_size=cfg.image_size or (source.image_size if payload and not cross else None),
        train_subset=subset(cfg.train_subset, source.train_subset),
        test_subset=subset(cfg.test_subset, source.test_subset), encoder_dtype=source.encoder_dtype,
        cache_dir=cfg.cache_dir or source.cache_dir, skip_bad_images=bool(cfg.skip_bad_images or
                                                                           source.skip_bad_images),
        check_data=(lambda train: _check_classes(train, source, payload["labels"])) if payload else None,
        log=lambda text: print(f"[evaluate] {text}", file=sys.stderr))
    epochs = cfg.epochs or (DEFAULT_FULL_EPOCHS if cfg.baseline == "full" else DEFAULT_EPOCHS)
    lam = cfg.lam if cfg.lam is not None else source.lam
    p = Protocol(exp, FeatureTransform.fit(cfg.features or source.features, exp.phi_train), lam,
                 build_augment(cfg.augment), cfg.aug_draws if cfg.augment != "none" else 1, epochs,
                 list(range(cfg.seeds)), device)
    if payload:
        found = _distilled(p, payload, cfg.pool_seed)
    elif cfg.baseline == "random":
        found = _random_real(p, cfg.ipc)
    elif cfg.baseline == "centroids":
        found = _centroids(p, cfg.ipc, cfg.pool_seed)
    else:
        found = _full_real(p)
    draws = None if cfg.baseline == "full" else p.draws
    ridges = found["ridges"]
    results = summarize(found["per_seed"]) | {
        "ridge_top1_mean": sum(ridges) / len(ridges), "ridge_top1_per_seed": ridges, "ridge_lam": lam,
        "evaluated": found["what"], "distilled": payload["path"] if payload else None, "baseline": cfg.baseline,
        "ipc": cfg.ipc if cfg.baseline else source.ipc, "eval_model": eval_model, "eval_weights": eval_weights,
        "distill_model": source.model if payload else None, "image_size": exp.image_size, "epochs": epochs,
        "aug_draws": draws, "augment": "none (cached features)" if draws is None else
        f"{cfg.augment} (fresh every epoch)" if draws == 0 else cfg.augment,
        "num_test": len(exp.y_test), "num_train": len(exp.y_train), "selected_rows": found["selected"],
        "seconds": time.perf_counter() - t_start,
    }
    views = "fresh draws every epoch" if draws == 0 else f"{draws} draws/image"
    print(f"\nLinear-probe protocol ({epochs} epochs, {results['augment']}, {views}) on "
          f"{len(exp.y_test)} real test images, {eval_model}{' (cross-model)' if cross else ''}:\n"
          f"  {found['what']}\n"
          f"  top-1 {100 * results['top1_mean']:.2f} +- {100 * results['top1_std']:.2f} %   "
          f"top-5 {100 * results['top5_mean']:.2f} +- {100 * results['top5_std']:.2f} %   ({len(p.seeds)} seeds)\n"
          f"  ridge probe (lam={lam:g}): {100 * results['ridge_top1_mean']:.2f} %   "
          f"[{results['seconds']:.0f}s]")
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.save_json(results, path)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(EvalConfig(**vars(build_parser().parse_args(argv))))


if __name__ == "__main__":
    run_main(main)
