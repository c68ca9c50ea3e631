"""The evaluate CLI: distilled sets, cross-model, baselines, bad input."""
import json

import pytest
import torch

from clpdd_fast.evaluate import main

from helpers import TINY_MODEL


def cli(data, cache, *extra):
    return ["--data", str(data), "--cache-dir", str(cache), "--device", "cpu", "--image-size", "16",
            "--epochs", "3", "--seeds", "2", "--aug-draws", "2", *extra]


def distilled_file(tmp_path, data, num_classes=4, **cfg):
    path = tmp_path / "run" / "distilled.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"data": str(data), "model": TINY_MODEL, "weights": "none", "image_size": 16, "num_classes": num_classes,
              "class_names": [str(i) for i in range(num_classes)], "train_subset": None, "test_subset": None,
              "encoder_dtype": "fp32", "lam": 0.1, "features": "center-l2", "ipc": 1} | cfg
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
    with pytest.raises(FileNotFoundError, match="--distilled: .* is neither a distilled.pt"):  # an error line
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


def test_cli_literal_protocol_with_aug_draws_0(tiny_idx, tmp_path, monkeypatch):
    """--aug-draws 0 trains on fresh draws every epoch (train_linear_probe_fresh), not on a cached pool."""
    import clpdd_fast.evaluate as ev
    calls = []
    real = ev.train_linear_probe_fresh
    monkeypatch.setattr(ev, "augmented_features", lambda *a, **k: pytest.fail("no pool with --aug-draws 0"))
    monkeypatch.setattr(ev, "train_linear_probe_fresh", lambda *a, **k: calls.append(k) or real(*a, **k))
    path = distilled_file(tmp_path, tiny_idx)
    args = cli(tiny_idx, tmp_path / "cache", "--distilled", str(path))
    args[args.index("--aug-draws") + 1] = "0"
    res = main(args)
    assert len(calls) == 1 and calls[0]["epochs"] == 3 and calls[0]["seeds"] == [0, 1]
    assert res["aug_draws"] == 0 and res["augment"] == "flip_crop (fresh every epoch)"
    assert len(res["top1_per_seed"]) == 2
    with pytest.raises(SystemExit):
        args[args.index("--aug-draws") + 1] = "-1"
        main(args)
