"""What `distill` and `evaluate` both set up: dataset -> frozen encoder -> image size -> real subsets -> cached features.

The policy both tools follow lives here too: the embedded default's subset size, the fixed subset rows (shared by
every seed and both tools, so they share one feature cache), the default image size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from clpdd_fast.datasets import IdxDataset, ImageDataset, open_dataset
from clpdd_fast.encoders import FrozenEncoder, build_encoder
from clpdd_fast.feature_cache import load_or_extract_features

EMBEDDED_SUBSET = 5000  # real train / test rows used when --data is omitted (keeps the default run in minutes)


def subset_size(requested: int | None, embedded: bool) -> int | None:
    """Rows of a split to use: what was asked, else EMBEDDED_SUBSET on the embedded default, else all (None)."""
    return requested if requested is not None or not embedded else EMBEDDED_SUBSET


def fixed_subset(n: int, k: int | None) -> np.ndarray | None:
    """A fixed (seed-independent, so caches are shared across seeds and tools) sorted random subset of k of n rows;
    None for all rows."""
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:k])


def default_image_size(dataset: ImageDataset, encoder: FrozenEncoder) -> int:
    """64 px for IDX data (28 px sources such as Fashion-MNIST), the encoder's own input size otherwise."""
    return 64 if dataset.kind == IdxDataset.kind else encoder.default_image_size


@dataclass
class Experiment:
    """The real data of a run under its frozen encoder. Features are the cached, memory-mapped (n, d) matrices;
    train_rows are the dataset rows of phi_train / y_train (a subset, less any undecodable images)."""
    train: ImageDataset
    test: ImageDataset
    encoder: FrozenEncoder
    image_size: int
    phi_train: Tensor
    y_train: Tensor
    train_rows: np.ndarray
    phi_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def open_experiment(data: str | None, model: str, weights: str, device, *, image_size: int | None = None,
                    train_subset: int | None = None, test_subset: int | None = None, encoder_dtype: str = "fp32",
                    cache_dir: str, skip_bad_images: bool = False, progress: bool = True,
                    check_data=None, log=lambda text: None) -> Experiment:
    """Open both splits of `data` (None: the embedded default), build the encoder, and load (or extract once into
    `cache_dir`) the real features of the train / test subsets (None: EMBEDDED_SUBSET rows on the embedded default,
    all rows otherwise). encoder_dtype "bf16" stores the features in bf16, otherwise fp16. check_data(train), when
    given, can reject the training split before any work; log(text) is called once, before any extraction, with a
    line saying what is used."""
    train, test = open_dataset(data, "train"), open_dataset(data, "test")
    if check_data is not None:
        check_data(train)
    if test.num_classes != train.num_classes:
        raise SystemExit(f"error: train split has {train.num_classes} classes, test split {test.num_classes}")
    encoder = build_encoder(model, weights, device, image_size=image_size)
    image_size = image_size or default_image_size(train, encoder)
    store_dtype = torch.bfloat16 if encoder_dtype == "bf16" else torch.float16
    embedded = data is None

    def features(dataset, k):  # -> features, labels and the dataset rows they belong to (bad images left out)
        return load_or_extract_features(encoder, dataset, image_size, cache_dir, dtype=store_dtype, device=device,
                                        indices=fixed_subset(len(dataset), subset_size(k, embedded)),
                                        progress=progress, skip_bad_images=skip_bad_images, return_rows=True)

    log(f"real features: {model} ({weights}) at {image_size}px, cache {cache_dir}")
    phi_train, y_train, train_rows = features(train, train_subset)
    phi_test, y_test, _ = features(test, test_subset)
    return Experiment(train, test, encoder, image_size, phi_train, y_train, train_rows, phi_test, y_test)
