"""LGM's evaluation protocol as a library function: a fresh linear head trained on frozen, augmented features.

Protocol (docs/METHOD.md, section 4; Cazenavette et al.'s eval.py): a linear head (weights ~ N(0, 0.01^2),
zero bias) on the frozen encoder's features of the training images (the distilled set, a baseline's real images, or
all real training images), each epoch a shuffled pass in batches of B = min(100, n), every image freshly augmented
(horizontal flip + random-resized-crop), Adam with lr = 1e-3 * B / 256, no weight decay, cosine annealing of the
learning rate stepped once per epoch (CosineAnnealingLR(T_max=epochs, eta_min=0)), cross-entropy; then top-1 / top-5
on the real test features.

Why this is fast: the encoder is frozen, so an image's feature depends only on the image and its augmentation draw.
Instead of re-running the encoder in every epoch (1000 epochs x n forwards), ``augmented_features`` computes a *pool*
of P augmentation draws per image once, in large no-grad batches; each epoch then picks, for every image, one of its
P cached draws uniformly at random (per seed). Training is then small matmuls on cached features, and all seeds are
trained together in one batched parameter (Adam is element-wise, so each seed's slice evolves exactly as if it were
trained alone). With P = 32 and the embedded default this takes seconds instead of the ~10^4 encoder forwards of the
literal protocol. What it changes: an image is seen under at most P distinct augmentations instead of one per epoch
(1000); raise P (``--aug-draws``) to approach the literal protocol, or run the literal protocol itself with
``train_linear_probe_fresh`` (``--aug-draws 0``): a new draw of every image in every epoch, encoded again.

Two deliberate differences from LGM's script, both making the number more conservative: we report the accuracy after
the last epoch (LGM keeps the best test accuracy over periodic evaluations, i.e. early stopping on the test set), and
the features are computed in float32 (no autocast).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clpdd_fast import validation as check
from clpdd_fast.augment import Augment, AugmentParams
from clpdd_fast.scan import SCAN_ROWS, row_blocks


@torch.no_grad()
def augmented_features(encoder: torch.nn.Module, images: Tensor, augment: Augment, draws: int, image_size: int,
                       generator: torch.Generator, encoder_batch: int = 256, device=None) -> Tensor:
    """Features of `draws` independent augmentations of every image, computed once in no-grad batches.

    Args:
        encoder: frozen encoder, images in [0, 1] (B, 3, image_size, image_size) -> (B, d) float32.
        images: float (n, 3, S, S) in [0, 1], any device.
        augment: the augmentation (the protocol uses build_augment("flip_crop")); "none" just resizes.
        draws: P >= 1, augmentation draws per image.
        image_size: encoder input resolution.
        generator: CPU generator of the augmentation draws (the pool is reproducible given its state).
        encoder_batch: images per encoder call.
        device: where the encoder runs (default: the encoder's parameters' device).
    Returns: float32 (P, n, d) on the CPU; row [p, i] is image i under draw p.
    """
    check.integer("draws", draws, minimum=1)
    _check_images(images)
    if device is None:
        device = next(encoder.parameters()).device
    n = images.shape[0]
    images = images.float().to(device)
    params = augment.sample(draws * n, generator, device)  # row k = draw k // n of image k % n
    out = []
    for start in range(0, draws * n, encoder_batch):
        rows = torch.arange(start, min(start + encoder_batch, draws * n))
        batch = augment.apply(images[(rows % n).to(device)], params.select(rows), image_size)
        out.append(encoder(batch).float().cpu())
    return torch.cat(out).view(draws, n, -1)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a float tensor (n, 3, S, S), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")


def _check_features(name: str, x: Tensor, labels: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a (n, d) or (P, n, d) feature tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != x.shape[-2]:
        raise ValueError(f"labels of {name}: expected a 1-D tensor of {x.shape[-2]} class indices, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")


@torch.no_grad()
def topk_accuracy(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, chunk_rows: int = SCAN_ROWS,
                  ks: Sequence[int] = (1, 5)) -> Tensor:
    """Accuracies (S, len(ks)) of S linear heads weight (S, d, C), bias (S, C) on features (N, d), labels (N,).
    k is clipped to C (top-5 with fewer than 5 classes is 1.0)."""
    S, _, C = weight.shape
    correct = torch.zeros(S, len(ks), dtype=torch.float64)
    for rows in row_blocks(features.shape[0], chunk_rows):
        x = features[rows].to(weight.device, torch.float32)
        y = labels[rows].to(weight.device)
        logits = torch.einsum("nd,sdc->snc", x, weight) + bias[:, None, :]
        top = logits.topk(min(max(ks), C), dim=2).indices  # (S, n, kmax)
        hit = top == y.view(1, -1, 1)
        for j, k in enumerate(ks):
            correct[:, j] += hit[:, :, :min(k, C)].any(2).sum(1).double().cpu()
    return correct / features.shape[0]


def train_linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                       num_classes: int, *, epochs: int = 1000, seeds: Sequence[int] = (0,),
                       batch_size: int | None = None, lr: float | None = None, init_std: float = 0.01,
                       device=None) -> list[dict]:
    """Train one fresh linear head per seed with LGM's protocol on cached features; evaluate on the test features.

    Args:
        train_features: float (n, d) (one fixed feature per image) or (P, n, d) (a pool of P augmentation draws per
            image, from ``augmented_features``); each epoch uses, per image, one draw picked uniformly at random.
        train_labels: int (n,) class indices in [0, num_classes).
        test_features: float (N, d) (any float dtype, may be memory-mapped); test_labels: int (N,).
        num_classes: C.
        epochs: passes over the n training images (>= 1); the cosine schedule spans them.
        seeds: one head per seed; seed s controls the head's initialisation, the shuffling and the draws, and gives
            the same result whichever other seeds are trained alongside it.
        batch_size: default min(100, n); lr: default 1e-3 * batch_size / 256 (the linear scaling rule).
        init_std: standard deviation of the initial weights (bias starts at zero).
        device: where to train (default: CPU).
    Returns: one dict per seed: {"seed", "top1", "top5", "final_train_loss"}.
    """
    _check_features("train_features", train_features, train_labels)
    _check_features("test_features", test_features, test_labels)
    _check_common(train_labels, test_features, test_labels, num_classes, epochs, seeds, train_features.shape[-1])
    return _with_one_thread(device, lambda dev: _train(_pool_views(train_features, dev), train_labels,
                                                       test_features, test_labels, num_classes, epochs, seeds,
                                                       batch_size, lr, init_std, dev))


def train_linear_probe_fresh(encoder: torch.nn.Module, images: Tensor, augment: Augment, image_size: int,
                             train_labels: Tensor, test_features: Tensor, test_labels: Tensor, num_classes: int, *,
                             epochs: int = 1000, seeds: Sequence[int] = (0,), batch_size: int | None = None,
                             lr: float | None = None, init_std: float = 0.01, device=None,
                             encoder_batch: int = 256) -> list[dict]:
    """The literal protocol: like ``train_linear_probe``, but every epoch every image is augmented afresh (its own
    draw per seed, from the seed's generator) and encoded again, as LGM's script does, instead of picking one of a
    cached pool of draws. Costs epochs x len(seeds) x n encoder forwards; the head's training is the same code.

    Args:
        encoder: frozen encoder, images in [0, 1] (B, 3, image_size, image_size) -> (B, d); runs on its own device.
        images: float (n, 3, S, S) in [0, 1]; augment: the augmentation (the protocol: build_augment("flip_crop")).
        image_size: encoder input resolution; encoder_batch: images per encoder call.
        The other arguments and the result are those of ``train_linear_probe``.
    """
    _check_images(images)
    _check_features("test_features", test_features, test_labels)
    if not isinstance(train_labels, Tensor) or train_labels.dim() != 1 or train_labels.shape[0] != images.shape[0]:
        raise ValueError(f"train_labels: expected a 1-D tensor of {images.shape[0]} class indices (one per image), "
                         f"got {tuple(train_labels.shape) if isinstance(train_labels, Tensor) else train_labels!r}")
    _check_common(train_labels, test_features, test_labels, num_classes, epochs, seeds, None)
    threads = torch.get_num_threads()
    enc_device = next(encoder.parameters()).device
    imgs = images.float().to(enc_device)
    n = imgs.shape[0]

    @torch.no_grad()
    def views(gens, dev):
        """This epoch's features: for each seed, every image under a new draw of that seed's generator."""
        params = AugmentParams.cat([augment.sample(n, g, enc_device) for g in gens])
        torch.set_num_threads(threads)  # the encoder may use every thread; the head's small steps use one
        try:
            out = [encoder(augment.apply(imgs[rows % n], params.select(rows), image_size)).float().cpu()
                   for rows in torch.arange(len(gens) * n).split(encoder_batch)]
        finally:
            if dev.type == "cpu":
                torch.set_num_threads(1)
        table = torch.cat(out).to(dev)
        return table, torch.arange(len(gens) * n, device=dev).view(len(gens), n)

    return _with_one_thread(device, lambda dev: _train(views, train_labels, test_features, test_labels,
                                                       num_classes, epochs, seeds, batch_size, lr, init_std, dev))


def _check_common(train_labels, test_features, test_labels, num_classes, epochs, seeds, train_dim) -> None:
    check.integer("epochs", epochs, minimum=1)
    if len(seeds) < 1:
        raise ValueError("seeds: expected at least one seed")
    if train_dim is not None and train_dim != test_features.shape[-1]:
        raise ValueError(f"test_features: feature dimension {test_features.shape[-1]} differs from the training "
                         f"features' {train_dim} (were they computed by the same encoder?)")
    check.labels("train_labels", train_labels, num_classes)
    check.labels("test_labels", test_labels, num_classes)


def _with_one_thread(device, fn):
    """fn(device) with one intra-op thread on the CPU: the head's steps are tiny matmuls, where extra threads only
    add synchronisation (20x slower on a busy 2-core machine)."""
    device = torch.device(device or "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return fn(device)
    finally:
        torch.set_num_threads(threads)


def _pool_views(train_features: Tensor, device):
    """The cached-pool source of an epoch's features: for each seed, every image's draw picked at random."""
    pool = train_features if train_features.dim() == 3 else train_features.unsqueeze(0)
    pool = pool.to(device, torch.float32)
    P, n, d = pool.shape
    flat = pool.reshape(P * n, d)

    def views(gens, dev):
        draw = torch.stack([torch.randint(P, (n,), generator=g) for g in gens]).to(dev)   # (S, n)
        return flat, draw * n + torch.arange(n, device=dev)
    return views


def _train(views, train_labels, test_features, test_labels, num_classes, epochs, seeds, batch_size, lr, init_std,
           device) -> list[dict]:
    """views(gens, device) -> (table (R, d), rows (S, n)): this epoch's feature of image i for seed s is
    table[rows[s, i]]; it is called after the epoch's shuffle, with each seed's generator."""
    y_train = train_labels.to(device, torch.long)
    n = y_train.shape[0]
    B = int(batch_size or min(100, n))
    lr = float(lr if lr is not None else 1e-3 * B / 256)
    S = len(seeds)
    d = test_features.shape[-1]

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    weight = torch.stack([torch.randn(d, num_classes, generator=g) * init_std for g in gens]).to(device)
    weight.requires_grad_(True)
    bias = torch.zeros(S, num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    for _ in range(epochs):
        # Per seed: a shuffled order (like DataLoader(shuffle=True)), then this epoch's view of every image.
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)       # (S, n)
        table, image_rows = views(gens, device)
        rows = image_rows.gather(1, order)                                                   # rows of `table`
        for start in range(0, n, B):
            r = rows[:, start:start + B]
            x = table[r]                                                      # (S, b, d)
            logits = torch.baddbmm(bias.unsqueeze(1), x, weight)              # (S, b, C)
            # Sum over seeds of each seed's mean CE: each seed's gradient is that of its own loss.
            per_seed = F.cross_entropy(logits.reshape(-1, num_classes), y_train[order[:, start:start + B]].reshape(-1),
                                       reduction="none").view(S, -1).mean(1)
            loss = per_seed.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    acc = topk_accuracy(test_features, test_labels, weight.detach(), bias.detach())
    return [{"seed": int(s), "top1": float(acc[i, 0]), "top5": float(acc[i, 1]),
             "final_train_loss": float(per_seed[i].detach())} for i, s in enumerate(seeds)]


def summarize(per_seed: list[dict]) -> dict:
    """{"top1_mean", "top1_std", "top1_per_seed", "top5_*"} (std with ddof = 0, as LGM's np.std)."""
    out = {}
    for key in ("top1", "top5"):
        vals = [r[key] for r in per_seed]
        mean = sum(vals) / len(vals)
        out[f"{key}_mean"] = mean
        out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        out[f"{key}_per_seed"] = vals
    out["seeds"] = [r["seed"] for r in per_seed]
    return out
