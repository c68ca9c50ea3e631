"""The linear-probe protocol, the baselines and the evaluate CLI: honest numbers on tiny problems, clear errors."""
import json
import math

import pytest
import torch

from clpdd_fast.augment import build_augment
from clpdd_fast.baselines import centroid_indices, class_means, random_real_indices
from clpdd_fast.evaluate import main
from clpdd_fast.probe_protocol import augmented_features, summarize, train_linear_probe

from conftest import TINY_MODEL


def blobs(n_per_class, num_classes=5, d=16, spread=4.0, noise=1.0, draws=None, seed=0):
    """Gaussian blobs around well-separated class centres: linearly separable with a margin."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, d, generator=torch.Generator().manual_seed(123)) * spread
    y = torch.arange(n_per_class * num_classes) % num_classes
    shape = (len(y), d) if draws is None else (draws, len(y), d)
    return centres[y] + noise * torch.randn(shape, generator=g), y


# ----------------------------------------------------------------------------------------------- the protocol

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
    pool = augmented_features(encoder, images, aug, 4, 16, torch.Generator().manual_seed(7), batch_size=5)
    assert pool.shape == (4, 3, encoder.feature_dim)
    params = aug.sample(12, torch.Generator().manual_seed(7))
    with torch.no_grad():
        direct = encoder(aug.apply(images.repeat(4, 1, 1, 1), params, 16)).view(4, 3, -1)
    torch.testing.assert_close(pool, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pool[0], pool[1])  # draws differ


# ----------------------------------------------------------------------------------------------- baselines

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


# ----------------------------------------------------------------------------------------------- the CLI

def cli(data, cache, *extra):
    return ["--data", str(data), "--cache-dir", str(cache), "--device", "cpu", "--image-size", "16",
            "--epochs", "3", "--seeds", "2", "--aug-draws", "2", *extra]


def distilled_file(tmp_path, data, num_classes=4, **cfg):
    path = tmp_path / "run" / "distilled.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"data": str(data), "model": TINY_MODEL, "weights": "none", "image_size": 16, "num_classes": num_classes,
              "class_names": [str(i) for i in range(num_classes)], "train_subset": None, "test_subset": None,
              "precision": "fp32", "lam": 0.1, "features": "center-l2", "ipc": 1} | cfg
    torch.save({"images": torch.rand(num_classes, 3, 18, 18), "labels": torch.arange(num_classes),
                "config": config}, path)
    return path


def test_cli_evaluates_a_distilled_set_and_writes_json(tiny_idx, tmp_path):
    path = distilled_file(tmp_path, tiny_idx)
    out = tmp_path / "res.json"
    res = main(cli(tiny_idx, tmp_path / "cache", "--distilled", str(path.parent), "--model", "ignored",
                   "--json", str(out)))
    saved = json.loads(out.read_text())
    for key in ("top1_mean", "top1_std", "top1_per_seed", "top5_mean", "top5_std", "top5_per_seed"):
        assert key in saved
    assert len(saved["top1_per_seed"]) == 2 and saved["num_test"] == 24
    assert saved["distill_model"] == TINY_MODEL and res["top1_mean"] == saved["top1_mean"]


def test_cli_cross_model_evaluation(tiny_idx, tmp_path):
    path = distilled_file(tmp_path, tiny_idx)
    with pytest.raises(FileNotFoundError, match="weights"):  # another model defaults to its own ('default') weights,
        main(cli(tiny_idx, tmp_path / "cache", "--distilled", str(path), "--eval-model", "test_resnet"))  # not cached
    res = main(cli(tiny_idx, tmp_path / "cache", "--distilled", str(path), "--eval-model", "test_resnet",
                   "--eval-weights", "none"))
    assert res["eval_weights"] == "none" and len(res["top1_per_seed"]) == 2
    assert res["eval_model"] == "test_resnet" and res["distill_model"] == TINY_MODEL


@pytest.mark.parametrize("baseline", ["random", "centroids", "full"])
def test_cli_baselines_run_without_a_distilled_set(tiny_idx, tmp_path, baseline):
    res = main(cli(tiny_idx, tmp_path / "cache", "--baseline", baseline, "--model", TINY_MODEL, "--weights", "none"))
    assert len(res["top1_per_seed"]) == 2 and 0.0 <= res["top1_mean"] <= 1.0
    if baseline == "random":  # redrawn per seed
        assert len(res["selected_rows"]) == 2 and res["selected_rows"][0] != res["selected_rows"][1]
    if baseline == "centroids":
        assert len(res["selected_rows"]) == 4
    if baseline == "full":
        assert res["num_train"] == 48 and res["aug_draws"] is None  # cached un-augmented features


def test_cli_bad_input(tiny_idx, tmp_path):
    with pytest.raises(SystemExit, match="exactly one"):
        main(cli(tiny_idx, tmp_path))
    with pytest.raises(SystemExit, match="neither a distilled.pt"):
        main(cli(tiny_idx, tmp_path, "--distilled", str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="exactly one"):
        main(cli(tiny_idx, tmp_path, "--distilled", "x", "--baseline", "full"))
    bad = distilled_file(tmp_path, tiny_idx, num_classes=5)
    with pytest.raises(SystemExit, match="5 classes"):
        main(cli(tiny_idx, tmp_path, "--distilled", str(bad)))
    with pytest.raises(SystemExit) as exc:  # argparse: epochs < 1
        main(cli(tiny_idx, tmp_path, "--baseline", "full", "--epochs", "0"))
    assert exc.value.code == 2
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="--distilled: could not read"):  # run_main: error line, status 2
        main(cli(tiny_idx, tmp_path, "--distilled", str(garbage)))


def test_cli_skips_bad_images_as_the_distillation_did(broken_tree, tmp_path):
    root, bad, _ = broken_tree
    path = distilled_file(tmp_path, root, num_classes=3, class_names=["a", "b", "c"], skip_bad_images=True)
    res = main(cli(root, tmp_path / "cache", "--distilled", str(path)))  # the setting comes from the distilled set
    assert res["num_train"] == 9 and res["num_test"] == 6
    baseline = cli(root, tmp_path / "cache", "--baseline", "random", "--model", TINY_MODEL, "--weights", "none")
    with pytest.raises(ValueError, match="--skip-bad-images"):
        main(baseline)
    res = main(baseline + ["--skip-bad-images"])  # class b's one good image is every seed's pick
    assert res["num_train"] == 9 and [rows[1] for rows in res["selected_rows"]] == [4, 4]


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "nonsense"])
def test_cli_bad_device_is_an_argument_error(tiny_idx, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > (7 if device == "cuda:7" else 0):
        pytest.skip("this machine has that device")
    with pytest.raises(SystemExit) as exc:
        main(cli(tiny_idx, tmp_path, "--baseline", "full", "--device", device))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --device: " in err and repr(device) in err


def test_command_line_bad_device_without_a_traceback(tmp_path):
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "clpdd_fast.evaluate", "--baseline", "full", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m clpdd_fast.evaluate: error: argument --device:")
