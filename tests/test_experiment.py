"""The setup distill and evaluate share: fixed subsets, the default image size, data checked before any extraction."""
import os

import numpy as np
import pytest
import torch

from clpdd_fast.experiment import EMBEDDED_SUBSET, fixed_subset, open_experiment, subset_size

from helpers import TINY_MODEL


def test_fixed_subset_is_sorted_distinct_and_the_same_every_time():
    a = fixed_subset(1001, 37)
    assert a.shape == (37,) and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1001
    assert np.array_equal(a, fixed_subset(1001, 37))
    assert fixed_subset(37, 37) is None and fixed_subset(10, None) is None


def test_subset_size_defaults_only_on_the_embedded_data():
    assert subset_size(None, True) == EMBEDDED_SUBSET and subset_size(None, False) is None
    assert subset_size(7, True) == 7 and subset_size(7, False) == 7


def test_open_experiment_on_idx_data(tiny_idx, tmp_path):
    lines = []
    exp = open_experiment(str(tiny_idx), TINY_MODEL, "none", "cpu", train_subset=13, cache_dir=str(tmp_path),
                          progress=False, log=lines.append)
    assert exp.image_size == 64 and exp.num_classes == 4   # IDX data: 64 px whatever the encoder's own size
    assert exp.phi_train.shape == (13, exp.encoder.feature_dim) and exp.phi_test.shape[0] == 24
    assert exp.train_rows.tolist() == fixed_subset(48, 13).tolist()
    assert torch.equal(exp.y_train, exp.train.labels[torch.from_numpy(exp.train_rows)])
    assert len(lines) == 1 and "64px" in lines[0] and str(tmp_path) in lines[0]


def test_check_data_runs_before_any_extraction(tiny_idx, tmp_path):
    def refuse(train):
        assert train.num_classes == 4
        raise SystemExit("error: refused")

    with pytest.raises(SystemExit, match="refused"):
        open_experiment(str(tiny_idx), TINY_MODEL, "none", "cpu", cache_dir=str(tmp_path / "cache"),
                        check_data=refuse)
    assert not os.path.exists(tmp_path / "cache")
