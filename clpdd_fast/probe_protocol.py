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
(1000); raise P (``--aug-draws``) to approach the literal protocol.

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

from clpdd_fast.augment import Augment
from clpdd_fast.validation import integer


@torch.no_grad()
def augmented_features(encoder: torch.nn.Module, images: Tensor, augment: Augment, draws: int, out_size: int,
                       generator: torch.Generator, batch_size: int = 256, device=None) -> Tensor:
    """Features of `draws` independent augmentations of every image, computed once in no-grad batches.

    Args:
        encoder: frozen encoder, images in [0, 1] (B, 3, out_size, out_size) -> (B, d) float32.
        images: float (n, 3, S, S) in [0, 1], any device.
        augment: the augmentation (the protocol uses build_augment("flip_crop")); "none" just resizes.
        draws: P >= 1, augmentation draws per image.
        out_size: encoder input resolution.
        generator: CPU generator of the augmentation draws (the pool is reproducible given its state).
        batch_size: images per encoder call.
        device: where the encoder runs (default: the encoder's parameters' device).
    Returns: float32 (P, n, d) on the CPU; row [p, i] is image i under draw p.
    """
    integer("draws", draws, minimum=1)
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a float tensor (n, 3, S, S), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if device is None:
        device = next(encoder.parameters()).device
    n = images.shape[0]
    images = images.float().to(device)
    params = augment.sample(draws * n, generator, device)  # row k = draw k // n of image k % n
    out = []
    for start in range(0, draws * n, batch_size):
        rows = torch.arange(start, min(start + batch_size, draws * n))
        batch = augment.apply(images[(rows % n).to(device)], params.select(rows), out_size)
        out.append(encoder(batch).float().cpu())
    return torch.cat(out).view(draws, n, -1)


def _check_features(name: str, x: Tensor, labels: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a (n, d) or (P, n, d) feature tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != x.shape[-2]:
        raise ValueError(f"labels of {name}: expected a 1-D tensor of {x.shape[-2]} class indices, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")


@torch.no_grad()
def topk_accuracy(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, chunk_size: int = 65536,
                  ks: Sequence[int] = (1, 5)) -> Tensor:
    """Accuracies (S, len(ks)) of S linear heads weight (S, d, C), bias (S, C) on features (N, d), labels (N,).
    k is clipped to C (top-5 with fewer than 5 classes is 1.0)."""
    S, _, C = weight.shape
    correct = torch.zeros(S, len(ks), dtype=torch.float64)
    for start in range(0, features.shape[0], chunk_size):
        x = features[start:start + chunk_size].to(weight.device, torch.float32)
        y = labels[start:start + chunk_size].to(weight.device)
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
    integer("epochs", epochs, minimum=1)
    if len(seeds) < 1:
        raise ValueError("seeds: expected at least one seed")
    if train_features.shape[-1] != test_features.shape[-1]:
        raise ValueError(f"test_features: feature dimension {test_features.shape[-1]} differs from the training "
                         f"features' {train_features.shape[-1]} (were they computed by the same encoder?)")
    for name, y in (("train_labels", train_labels), ("test_labels", test_labels)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
    device = torch.device(device or "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The steps are tiny matmuls: extra threads only add synchronisation (20x slower on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        return _train(train_features, train_labels, test_features, test_labels, num_classes, epochs, seeds,
                      batch_size, lr, init_std, device)
    finally:
        torch.set_num_threads(threads)


def _train(train_features, train_labels, test_features, test_labels, num_classes, epochs, seeds, batch_size, lr,
           init_std, device) -> list[dict]:
    pool = train_features if train_features.dim() == 3 else train_features.unsqueeze(0)
    pool = pool.to(device, torch.float32)
    P, n, d = pool.shape
    flat = pool.reshape(P * n, d)
    y_train = train_labels.to(device, torch.long)
    B = int(batch_size or min(100, n))
    lr = float(lr if lr is not None else 1e-3 * B / 256)
    S = len(seeds)

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    weight = torch.stack([torch.randn(d, num_classes, generator=g) * init_std for g in gens]).to(device)
    weight.requires_grad_(True)
    bias = torch.zeros(S, num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    for _ in range(epochs):
        # Per seed: a shuffled order (like DataLoader(shuffle=True)) and one pool draw per image for this epoch.
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)       # (S, n)
        draw = torch.stack([torch.randint(P, (n,), generator=g) for g in gens]).to(device)   # (S, n)
        rows = draw.gather(1, order) * n + order                                             # rows of `flat`
        for start in range(0, n, B):
            r = rows[:, start:start + B]
            x = flat[r]                                                       # (S, b, d)
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
