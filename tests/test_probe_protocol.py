"""The linear-probe protocol: honest numbers on tiny separable / shuffled problems, the lr schedule, clear errors."""
import math

import pytest
import torch

from clpdd_fast.augment import build_augment
from clpdd_fast.probe_protocol import augmented_features, summarize, train_linear_probe, train_linear_probe_fresh


def blobs(n_per_class, num_classes=5, d=16, spread=4.0, noise=1.0, draws=None, seed=0):
    """Gaussian blobs around well-separated class centres: linearly separable with a margin."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, d, generator=torch.Generator().manual_seed(123)) * spread
    y = torch.arange(n_per_class * num_classes) % num_classes
    shape = (len(y), d) if draws is None else (draws, len(y), d)
    return centres[y] + noise * torch.randn(shape, generator=g), y


def test_separable_features_reach_full_accuracy():
    x, y = blobs(4, draws=3)
    xt, yt = blobs(100, seed=1)
    # lr 0.01: at the protocol's default (1e-3 * 20 / 256) 300 epochs leave the head under-trained on some draws
    res = train_linear_probe(x, y, xt, yt, 5, epochs=300, seeds=[0, 1], lr=0.01)
    assert all(r["top1"] >= 0.99 for r in res), res
    assert all(r["top5"] == 1.0 for r in res)


def test_shuffled_labels_give_chance_level():
    x, y = blobs(40, num_classes=5)
    xt, yt = blobs(200, num_classes=5, seed=1)
    g = torch.Generator().manual_seed(0)
    shuffled = y[torch.randperm(len(y), generator=g)]
    # the test labels shuffled too: with labels that follow the clusters, the score would measure whether each
    # cluster's majority shuffled label happens to be its own, not chance
    res = train_linear_probe(x, shuffled, xt, yt[torch.randperm(len(yt), generator=g)], 5, epochs=100,
                             seeds=[0, 1, 2])
    mean = sum(r["top1"] for r in res) / len(res)
    assert 0.14 <= mean <= 0.26, res  # chance is 0.2 (1000 test images: std of one head ~0.013)


def test_seeds_are_reproducible_and_different():
    x, y = blobs(3, noise=3.0, draws=4)
    xt, yt = blobs(60, noise=3.0, seed=1)
    a = train_linear_probe(x, y, xt, yt, 5, epochs=50, seeds=[0, 1, 2])
    b = train_linear_probe(x, y, xt, yt, 5, epochs=50, seeds=[0, 1, 2])
    assert a == b
    losses = [r["final_train_loss"] for r in a]
    assert len(set(losses)) == 3
    # A seed's run does not depend on which other seeds are trained alongside it.
    alone = train_linear_probe(x, y, xt, yt, 5, epochs=50, seeds=[1])[0]
    # batched and single products may round differently (not bitwise): at most one test image may flip
    assert abs(alone["top1"] - a[1]["top1"]) <= 1 / len(yt)
    assert alone["final_train_loss"] == pytest.approx(a[1]["final_train_loss"], rel=1e-5)


def test_default_batch_and_learning_rate_follow_the_protocol(monkeypatch):
    seen = {}
    real_adam = torch.optim.Adam

    def spy(params, lr, weight_decay):
        seen["lr"], seen["wd"] = lr, weight_decay
        return real_adam(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    x, y = blobs(2)
    train_linear_probe(x, y, x, y, 5, epochs=1)
    assert seen == {"lr": pytest.approx(1e-3 * 10 / 256), "wd": 0.0}


def test_learning_rate_follows_the_cosine_schedule_epoch_by_epoch(monkeypatch):
    # every optimiser step of epoch e runs at lr0 (1 + cos(pi e / epochs)) / 2 (CosineAnnealingLR stepped per epoch)
    seen = []
    real_adam = torch.optim.Adam

    class Spy(real_adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    x, y = blobs(5)                       # 25 images in batches of 10: 3 steps per epoch
    epochs, lr0 = 7, 0.02
    train_linear_probe(x, y, x, y, 5, epochs=epochs, batch_size=10, lr=lr0)
    expect = [lr0 * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs) for _ in range(3)]
    assert seen == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_protocol_rejects_bad_input():
    x, y = blobs(2)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe(x, y, x, y, 5, epochs=0)
    with pytest.raises(ValueError, match="train_labels"):
        train_linear_probe(x, y + 10, x, y, 5, epochs=1)
    with pytest.raises(ValueError, match="feature dimension"):
        train_linear_probe(x, y, x[:, :3], y, 5, epochs=1)
    with pytest.raises(ValueError, match="labels of train_features"):
        train_linear_probe(x, y[:3], x, y, 5, epochs=1)


def test_summarize():
    s = summarize([{"seed": 0, "top1": 0.5, "top5": 1.0}, {"seed": 1, "top1": 0.7, "top5": 1.0}])
    assert s["top1_mean"] == pytest.approx(0.6) and s["top1_std"] == pytest.approx(0.1)
    assert s["top1_per_seed"] == [0.5, 0.7] and s["top5_std"] == 0.0


def test_augmented_feature_pool_matches_direct_encoding(encoder):
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    aug = build_augment("flip_crop")
    pool = augmented_features(encoder, images, aug, 4, 16, torch.Generator().manual_seed(7), encoder_batch=5)
    assert pool.shape == (4, 3, encoder.feature_dim)
    params = aug.sample(12, torch.Generator().manual_seed(7))
    with torch.no_grad():
        direct = encoder(aug.apply(images.repeat(4, 1, 1, 1), params, 16)).view(4, 3, -1)
    torch.testing.assert_close(pool, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pool[0], pool[1])  # draws differ


class MeanColour(torch.nn.Module):
    """A frozen 'encoder' whose feature is an image's mean colour (flip and crop keep it close), with a call log."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device
        self.batches = []

    def forward(self, x):
        self.batches.append(x.clone())
        return x.mean((2, 3)) * 10


def colour_images(n_per_class, num_classes=3, size=12, seed=0):
    """Images of class-specific colours with pixel noise: separable by mean colour."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_per_class * num_classes) % num_classes
    base = torch.eye(3)[y] * 0.6 + 0.2
    return (base[:, :, None, None] + 0.05 * torch.randn(len(y), 3, size, size, generator=g)).clamp(0, 1), y


def test_literal_protocol_encodes_fresh_draws_every_epoch():
    images, y = colour_images(2)                     # n = 6 images
    test_x, test_y = colour_images(20, seed=1)
    enc = MeanColour()
    with torch.no_grad():
        test_f = enc(test_x)
    enc.batches.clear()
    epochs, seeds = 4, [0, 1]
    res = train_linear_probe_fresh(enc, images, build_augment("flip_crop"), 8, y, test_f, test_y, 3,
                                   epochs=epochs, seeds=seeds, lr=0.05, encoder_batch=5)
    assert max(len(b) for b in enc.batches) == 5                     # in batches of encoder_batch
    views = torch.cat(enc.batches)
    assert views.shape == (epochs * len(seeds) * 6, 3, 8, 8)        # every image, for every seed, in every epoch
    per_epoch = views.view(epochs, len(seeds) * 6, -1)
    # a new draw in every epoch and for every seed: no two views of one image are the same
    for i in range(6):
        v = torch.cat([per_epoch[:, s * 6 + i] for s in range(len(seeds))])
        assert torch.cdist(v, v).add(torch.eye(len(v)) * 1e9).min() > 1e-4
    assert [r["seed"] for r in res] == seeds and all(r["top1"] == 1.0 for r in res), res


def test_literal_protocol_learns_and_its_seeds_are_independent():
    images, y = colour_images(3)
    test_x, test_y = colour_images(30, seed=1)
    enc = MeanColour()
    with torch.no_grad():
        test_f = enc(test_x)
    both = train_linear_probe_fresh(enc, images, build_augment("flip_crop"), 8, y, test_f, test_y, 3, epochs=30,
                                    seeds=[3, 4], lr=0.05)
    alone = train_linear_probe_fresh(enc, images, build_augment("flip_crop"), 8, y, test_f, test_y, 3, epochs=30,
                                     seeds=[4], lr=0.05)[0]
    assert all(r["top1"] == 1.0 for r in both)
    assert alone["final_train_loss"] == pytest.approx(both[1]["final_train_loss"], rel=1e-5)
    assert both[0]["final_train_loss"] != both[1]["final_train_loss"]


def test_literal_protocol_rejects_bad_input():
    images, y = colour_images(1)
    enc = MeanColour()
    feats = torch.rand(5, 3)
    aug = build_augment("flip_crop")
    with pytest.raises(ValueError, match="images"):
        train_linear_probe_fresh(enc, images[:, :2], aug, 8, y, feats, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="train_labels"):
        train_linear_probe_fresh(enc, images, aug, 8, y[:2], feats, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe_fresh(enc, images, aug, 8, y, feats, torch.zeros(5, dtype=torch.long), 3, epochs=0)
