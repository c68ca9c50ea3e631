"""The baselines: centroids and random real images per class."""
import pytest
import torch

from clpdd_fast.baselines import centroid_indices, class_means, random_real_indices


def test_centroid_is_the_real_row_nearest_its_class_mean():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g).half()
    labels = torch.arange(60) % 3
    rows = centroid_indices(feats, labels, 3)
    means = class_means(feats, labels, 3)
    for c in range(3):
        members = torch.nonzero(labels == c).flatten()
        dist = ((feats[members].double() - means[c]) ** 2).sum(1)
        assert int(rows[c]) == int(members[dist.argmin()])
        assert int(labels[rows[c]]) == c
    torch.testing.assert_close(means[1], feats[labels == 1].double().mean(0))


def test_centroids_with_several_per_class_are_distinct_members():
    feats = torch.randn(90, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(90) % 3
    rows = centroid_indices(feats, labels, 3, ipc=3)
    assert len(set(rows.tolist())) == 9
    assert labels[rows].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(rows, centroid_indices(feats, labels, 3, ipc=3))


def test_random_real_picks_per_class_reproducibly():
    labels = torch.arange(100) % 4
    a, b = random_real_indices(labels, 4, 2, seed=0), random_real_indices(labels, 4, 2, seed=0)
    assert torch.equal(a, b)
    assert labels[a].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(set(a.tolist())) == 8
    assert not torch.equal(a, random_real_indices(labels, 4, 2, seed=1))
    with pytest.raises(ValueError, match="fewer than ipc"):
        random_real_indices(labels, 4, 26, seed=0)
