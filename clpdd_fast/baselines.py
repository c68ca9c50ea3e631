"""The standard baselines of dataset distillation, as row selections from the real training set (docs/METHOD.md, section 4).

- random: `ipc` random real images per class, a different draw per seed.
- centroids: per class, the real image whose feature is nearest (Euclidean, raw encoder features) to the class-mean
  feature; with ipc > 1, k-means with ipc clusters inside the class (fixed seed, k-means++ start) and the real image
  nearest each cluster centre.
- full: all real training images (nothing to select; evaluate.py trains the probe on all cached training features).
All functions return row indices into the given labels / features, class by class.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clpdd_fast import validation as check
from clpdd_fast.scan import row_blocks

BASELINES = ("random", "centroids", "full")


def _check(labels: Tensor, num_classes: int, ipc: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError(f"labels: expected a 1-D tensor of class indices, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    check.integer("ipc", ipc, minimum=1)
    counts = torch.bincount(labels.cpu().long(), minlength=num_classes)[:num_classes]
    short = [c for c in range(num_classes) if int(counts[c]) < ipc]
    if short:
        raise ValueError(f"ipc: class(es) {short[:5]} have fewer than ipc={ipc} real images "
                         f"(counts {[int(counts[c]) for c in short[:5]]})")


def random_real_indices(labels: Tensor, num_classes: int, ipc: int, seed: int) -> Tensor:
    """ipc distinct random rows of each class (classes in order); same seed -> same rows. Returns int64 (C * ipc,)."""
    _check(labels, num_classes, ipc)
    g = torch.Generator().manual_seed(int(seed))
    labels = labels.cpu()
    picks = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        picks.append(rows[torch.randperm(len(rows), generator=g)[:ipc]])
    return torch.cat(picks)


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean feature of each class, float64 (C, d), read block by block (features may be a memory-mapped fp16 array)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    labels = labels.cpu().long()
    for rows in row_blocks(features.shape[0]):
        sums.index_add_(0, labels[rows], features[rows].double().cpu())
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes].clamp(min=1).double()
    return sums / counts[:, None]


def _kmeans(x: Tensor, k: int, seed: int, iterations: int = 25) -> Tensor:
    """k-means++ initialisation then Lloyd iterations on x (n, d) float64; returns centres (k, d)."""
    g = torch.Generator().manual_seed(int(seed))
    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
        centres.append(x[torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1,
                                           generator=g)].squeeze(0))
    c = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c


def centroid_indices(features: Tensor, labels: Tensor, num_classes: int, ipc: int = 1, seed: int = 0) -> Tensor:
    """Per class, the real row(s) nearest the class-mean feature (ipc = 1) or nearest each of ipc k-means centres.

    features: (N, d) raw encoder features of the real training images (any float dtype); labels: (N,).
    Returns int64 (C * ipc,) distinct rows, classes in order. Deterministic (seed only matters for ipc > 1).
    """
    _check(labels, num_classes, ipc)
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features: expected ({labels.shape[0]}, d), got {tuple(features.shape)}")
    labels = labels.cpu().long()
    means = class_means(features, labels, num_classes) if ipc == 1 else None
    picks = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        x = features[rows].double().cpu()
        centres = means[c:c + 1] if ipc == 1 else _kmeans(x, ipc, seed + c)
        dist = torch.cdist(centres, x)  # (ipc, n_c)
        chosen: list[int] = []
        for j in range(ipc):  # nearest row to each centre, never the same row twice
            order = dist[j].argsort()
            chosen.append(next(int(i) for i in order if int(i) not in chosen))
        picks.append(rows[torch.tensor(chosen)])
    return torch.cat(picks)
