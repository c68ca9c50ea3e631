"""The distillation pipeline: chunked recomputation is exact, end to end runs, resume, clear errors."""
import json
import os

import numpy as np
import pytest
import torch

from clpdd_fast.augment import build_augment
from clpdd_fast.distill import main
from clpdd_fast.feature_transform import FeatureTransform
from clpdd_fast.methods import ClpddInputs, StepInputs, clpdd_loss_plain, clpdd_step
from clpdd_fast.synthetic import build_synthetic

from helpers import TINY_MODEL, run_args


def step_inputs(encoder, encoder_batch, real_batch=None, outer="ce"):
    g = torch.Generator().manual_seed(5)
    real = torch.randn(40, encoder.feature_dim, generator=g)
    transform = FeatureTransform.fit("center-l2", real)
    clpdd = ClpddInputs(real_features=transform(real), real_labels=torch.arange(40) % 3, transform=transform,
                        lam=0.3, tau=0.2, outer=outer, real_batch=real_batch)
    return StepInputs(encoder=encoder, augment=build_augment("standard"), image_size=32, num_classes=3,
                      encoder_batch=encoder_batch, clpdd=clpdd)


@pytest.mark.parametrize("param", ["pixel", "pyramid"])
@pytest.mark.parametrize("encoder_batch,real_batch,outer", [(1, None, "ce"), (2, 25, "ce"), (4, None, "mse"),
                                                         (7, None, "ce")])
def test_chunked_recomputation_equals_one_graph(encoder, param, encoder_batch, real_batch, outer):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    init = torch.rand(7, 3, 36, 36, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    synthetic = build_synthetic(param, labels, 36, init, grow_every=0)
    inputs = step_inputs(encoder, encoder_batch, real_batch, outer)

    loss = clpdd_step(synthetic, inputs, torch.Generator().manual_seed(11))
    chunked = [p.grad.clone() for p in synthetic.parameters()]
    synthetic.zero_grad()
    plain = clpdd_loss_plain(synthetic, inputs, torch.Generator().manual_seed(11))
    plain.backward()
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-5, atol=1e-6)
    for got, p in zip(chunked, synthetic.parameters()):
        scale = p.grad.abs().max()
        assert scale > 0
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-4 * float(scale))


def test_end_to_end_outputs(tiny_idx, tmp_path):
    out = tmp_path / "run"
    results = main(run_args(tiny_idx, out, tmp_path / "cache", "--iterations", "3", "--ipc", "2",
                            "--augment", "standard", "--param", "pyramid"))
    for name in ["distilled.pt", "distilled.png", "config.json", "metrics.jsonl", "checkpoint.pt", "results.json",
                 "distilled.safetensors", "distilled"]:
        assert (out / name).exists(), name
    saved = torch.load(out / "distilled.pt")
    assert saved["images"].shape == (8, 3, 36, 36)
    assert 0 <= saved["images"].min() and saved["images"].max() <= 1
    assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # the same set for other tools (tests/test_export.py tests the formats)
    from safetensors.torch import load_file
    from torchvision.datasets import ImageFolder
    exported = load_file(str(out / "distilled.safetensors"))
    assert torch.equal(exported["images"], saved["images"]) and torch.equal(exported["labels"], saved["labels"])
    tree = ImageFolder(str(out / "distilled"))
    assert tree.targets == saved["labels"].tolist() and len(tree.classes) == 4
    pixels = (saved["images"][7].double() * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(tree[7][0]), pixels)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["step_time_s"] > 0 and r["step_cpu_s"] > 0 for r in rows)
    assert set(results["ridge_top1"]) == {"distilled", "random_real", "all_real_train"}
    assert json.loads((out / "config.json").read_text())["ipc"] == 2


def test_resume_equals_uninterrupted(tiny_idx, tmp_path):
    cache = tmp_path / "cache"
    common = ("--augment", "standard", "--seed", "3", "--checkpoint-every", "1")
    main(run_args(tiny_idx, tmp_path / "full", cache, "--iterations", "6", *common))
    main(run_args(tiny_idx, tmp_path / "part", cache, "--iterations", "3", *common))
    main(run_args(tiny_idx, tmp_path / "part", cache, "--iterations", "6", "--resume", *common))
    full = torch.load(tmp_path / "full" / "distilled.pt")["images"]
    part = torch.load(tmp_path / "part" / "distilled.pt")["images"]
    assert torch.equal(full, part)
    losses = lambda run: [json.loads(r)["loss"] for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("full") == losses("part")


def test_resume_refuses_changed_settings(tiny_idx, tmp_path):
    main(run_args(tiny_idx, tmp_path / "r", tmp_path / "cache", "--iterations", "1"))
    with pytest.raises(SystemExit, match="--lam"):
        main(run_args(tiny_idx, tmp_path / "r", tmp_path / "cache", "--iterations", "2", "--resume", "--lam", "9"))
    before = (tmp_path / "r" / "distilled.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"holds step 1, past --iterations 0: pass --iterations 1 or more"):
        main(run_args(tiny_idx, tmp_path / "r", tmp_path / "cache", "--iterations", "0", "--resume"))
    assert (tmp_path / "r" / "distilled.pt").read_bytes() == before   # the run's set is left as it was


def test_resume_and_evaluate_accept_files_written_before_newer_settings(tiny_idx, tmp_path):
    """A checkpoint / distilled set whose saved config lacks settings added later: they take their defaults."""
    from clpdd_fast.evaluate import main as evaluate
    run = tmp_path / "r"
    main(run_args(tiny_idx, run, tmp_path / "cache", "--iterations", "1"))
    for name in ("checkpoint.pt", "distilled.pt"):
        payload = torch.load(run / name, weights_only=True)
        for key in ("skip_bad_images", "augs_per_batch", "world_size", "class_names"):
            payload["config"].pop(key, None)
        torch.save(payload, run / name)
    res = main(run_args(tiny_idx, run, tmp_path / "cache", "--iterations", "2", "--resume"))
    assert res["steps"] == 2
    with pytest.raises(SystemExit, match="--augs-per-batch was 10, now 3"):   # the default counts as the old value
        main(run_args(tiny_idx, run, tmp_path / "cache", "--iterations", "3", "--resume", "--augs-per-batch", "3"))
    payload = torch.load(run / "distilled.pt", weights_only=True)
    payload["config"].pop("skip_bad_images")
    torch.save(payload, run / "distilled.pt")
    out = evaluate(["--distilled", str(run), "--device", "cpu", "--epochs", "2", "--seeds", "1", "--aug-draws", "1"])
    assert out["image_size"] == 32 and out["num_train"] == 48


def test_existing_run_is_not_overwritten(tiny_idx, tmp_path):
    main(run_args(tiny_idx, tmp_path / "r", tmp_path / "cache", "--iterations", "1"))
    with pytest.raises(SystemExit, match="--resume"):
        main(run_args(tiny_idx, tmp_path / "r", tmp_path / "cache", "--iterations", "1"))


def test_missing_data_path(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="data"):
        main(run_args(tmp_path / "nowhere", tmp_path / "o", tmp_path / "c", "--iterations", "1"))


def test_empty_class_folder(tmp_path):
    from PIL import Image
    for split in ["train", "val"]:
        (tmp_path / "tree" / split / "empty").mkdir(parents=True)
        (tmp_path / "tree" / split / "full").mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "tree" / split / "full" / "a.png")
    with pytest.raises(ValueError, match="empty"):
        main(run_args(tmp_path / "tree", tmp_path / "o", tmp_path / "c", "--iterations", "1"))


def test_unknown_model(tiny_idx, tmp_path):
    args = run_args(tiny_idx, tmp_path / "o", tmp_path / "c", "--iterations", "1")
    args[args.index(TINY_MODEL)] = "no_such_model_xyz"
    with pytest.raises(ValueError, match="no_such_model_xyz"):
        main(args)


@pytest.mark.parametrize("flag,value", [("--ipc", "0"), ("--lam", "-1"), ("--tau", "0"), ("--real-batch", "0")])
def test_bad_numbers_rejected_by_the_cli(tiny_idx, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        main(run_args(tiny_idx, tmp_path / "o", tmp_path / "c", flag, value))
    assert flag in capsys.readouterr().err


def test_torchrun_two_ranks_equal_one_process(tiny_idx, tmp_path):
    """Two gloo ranks (each: half the synthetic images and half the real rows) take the same steps as one process."""
    import subprocess
    import sys
    # all real rows each step: with --real-batch each rank samples its own shard, a different (stratified) draw
    args = run_args(tiny_idx, tmp_path / "two", tmp_path / "cache", "--iterations", "3", "--ipc", "2",
                    "--augment", "standard")
    main(run_args(tiny_idx, tmp_path / "one", tmp_path / "cache", "--iterations", "3", "--ipc", "2",
                  "--augment", "standard"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "clpdd_fast.distill", *args], capture_output=True, text=True, timeout=600)
    # torchrun exits 0 only when every rank did; a rank torn down by interpreter exit used to abort (SIGABRT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and "Signal" not in proc.stderr, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "distilled.pt")
    two = torch.load(tmp_path / "two" / "distilled.pt")
    assert two["config"]["world_size"] == 2
    main(run_args(tiny_idx, tmp_path / "zero", tmp_path / "cache", "--iterations", "0", "--ipc", "2",
                  "--augment", "standard"))
    start = torch.load(tmp_path / "zero" / "distilled.pt")["images"]
    moved = (one["images"] - start).abs().max()
    # Adam amplifies rounding where a gradient is ~0, so compare with how far the images moved at all
    assert (two["images"] - one["images"]).abs().max() < 1e-2 * moved


def test_nvtx_ranges_cover_the_step(encoder, monkeypatch):
    from clpdd_fast import profiling
    names, depth = [], []
    monkeypatch.setattr(profiling, "_backend", (lambda n: (names.append(n), depth.append(1)),
                                                lambda: depth.pop()))
    monkeypatch.setattr(profiling, "_enabled", True)
    synthetic = build_synthetic("pixel", torch.tensor([0, 1, 2, 0]), 32, None)
    clpdd_step(synthetic, step_inputs(encoder, 2), torch.Generator().manual_seed(0))
    assert not depth  # every range closed
    for expected in ["encoder_forward", "decode_augment", "encoder", "outer_loss", "ridge_solve[dual]",
                     "linear_softmax_ce", "loss_backward", "encoder_reforward", "encoder_backward"]:
        assert expected in names, expected


def test_the_run_asks_for_the_split_ce_unless_the_environment_says_otherwise(encoder, monkeypatch):
    from clpdd_fast import reference
    seen = []
    real = reference.linear_ce_forward_backward
    monkeypatch.setattr(reference, "linear_ce_forward_backward", lambda *a: seen.append(a[4].precision) or real(*a))
    synthetic = build_synthetic("pixel", torch.tensor([0, 1, 2, 0]), 32, None)
    monkeypatch.delenv("CLPDD_CE_PRECISION", raising=False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    clpdd_step(synthetic, step_inputs(encoder, 2), torch.Generator().manual_seed(0))
    monkeypatch.setenv("CLPDD_CE_PRECISION", "medium")
    clpdd_step(synthetic, step_inputs(encoder, 2), torch.Generator().manual_seed(0))
    assert seen == ["high", "medium"]


def test_diverged_synthetic_features_raise(encoder):
    inputs = step_inputs(encoder, 2)
    inputs.encoder = lambda images: torch.full((images.shape[0], encoder.feature_dim), float("nan"))
    synthetic = build_synthetic("pixel", torch.tensor([0, 1, 2]), 32, None)
    with pytest.raises(ValueError, match="synthetic features"):
        clpdd_step(synthetic, inputs, torch.Generator().manual_seed(0))


def test_command_line_reports_bad_input_without_a_traceback(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "clpdd_fast.distill", "--data", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: data:" in proc.stderr and "Traceback" not in proc.stderr


def test_skip_bad_images_end_to_end(broken_tree, tmp_path, capsys):
    """Without --skip-bad-images the first undecodable file stops the run with the way out; with it the bad files are
    named, left out of the real features, and never picked: class b's only good image is its initialisation, and
    LGM's real batches (drawn from the good rows only) never reach a bad file."""
    from clpdd_fast.datasets import open_dataset

    root, bad, b_good = broken_tree
    args = run_args(root, tmp_path / "run", tmp_path / "cache", "--iterations", "0", "--ipc", "1",
                    "--augment", "none", "--image-size", "32")
    with pytest.raises(ValueError, match=f"{bad['train'][0]}.*--skip-bad-images"):
        main(args)
    capsys.readouterr()
    results = main(args + ["--skip-bad-images"])
    err = capsys.readouterr().err
    assert all(f"skipping undecodable image {p!r}" in err for p in bad["train"] + bad["val"])
    assert results["num_train"] == 9 and results["num_test"] == 6
    saved = torch.load(tmp_path / "run" / "distilled.pt")
    assert saved["config"]["skip_bad_images"] is True and saved["labels"].tolist() == [0, 1, 2]
    train = open_dataset(str(root), "train")
    expected = train.images([train.paths.index(os.path.relpath(b_good, train.split_dir))], 32)[0]
    torch.testing.assert_close(saved["images"][1], expected, rtol=0, atol=1e-3)
    lgm = main(run_args(root, tmp_path / "lgm", tmp_path / "cache", "--iterations", "2", "--ipc", "1",
                        "--method", "lgm", "--augs-per-batch", "4", "--augment", "none", "--skip-bad-images"))
    assert lgm["steps"] == 2


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "nonsense", "cpu:1", "meta"])
def test_bad_device_is_an_argument_error(tiny_idx, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > (7 if device == "cuda:7" else 0):
        pytest.skip("this machine has that device")
    with pytest.raises(SystemExit) as exc:
        main(run_args(tiny_idx, tmp_path / "o", tmp_path / "c", "--device", device))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --device: " in err and repr(device) in err
    assert not (tmp_path / "o").exists()  # stopped before anything was written


def test_command_line_bad_device_without_a_traceback(tmp_path):
    import subprocess
    import sys
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has cuda:7")
    proc = subprocess.run([sys.executable, "-m", "clpdd_fast.distill", "--device", "cuda:7", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m clpdd_fast.distill: error: argument --device:")


def test_a_non_finite_loss_stops_the_run_before_the_step_is_taken(tiny_idx, tmp_path, monkeypatch):
    """The step runs its ops unchecked (no host syncs): a NaN loss (a singular ridge system, a diverged run) stops the
    loop with an error line before the optimiser step; the last checkpoint stays and resumes."""
    from clpdd_fast import methods
    real, calls = methods.METHODS["clpdd"], []

    def third_is_nan(synthetic, inputs, generator):
        calls.append(1)
        loss = real(synthetic, inputs, generator)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setitem(methods.METHODS, "clpdd", third_is_nan)
    run = tmp_path / "r"
    with pytest.raises(SystemExit, match="^error: step 3: the loss is nan: .*--lam.*--lr"):
        main(run_args(tiny_idx, run, tmp_path / "cache", "--iterations", "5", "--checkpoint-every", "1"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setitem(methods.METHODS, "clpdd", real)
    assert main(run_args(tiny_idx, run, tmp_path / "cache", "--iterations", "5", "--checkpoint-every", "1",
                         "--resume"))["steps"] == 5


def test_init_centroids_starts_from_the_images_the_centroids_baseline_selects(tiny_idx, tmp_path):
    """--init centroids: step 0 is the set `evaluate --baseline centroids` scores (same rows, same order)."""
    from clpdd_fast import evaluate
    from clpdd_fast.datasets import open_dataset

    cache = tmp_path / "cache"
    for init in ("centroids", "real"):
        main(run_args(tiny_idx, tmp_path / init, cache, "--iterations", "0", "--ipc", "2", "--init", init,
                      "--augment", "none"))
    saved = torch.load(tmp_path / "centroids" / "distilled.pt")
    baseline = evaluate.main(["--data", str(tiny_idx), "--model", TINY_MODEL, "--weights", "none", "--image-size",
                              "32", "--cache-dir", str(cache), "--device", "cpu", "--epochs", "1", "--seeds", "1",
                              "--aug-draws", "1", "--baseline", "centroids", "--ipc", "2"])
    rows = baseline["selected_rows"]
    assert len(rows) == 8 and saved["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = open_dataset(str(tiny_idx), "train").images(rows, 32)   # all 48 training rows are used: row = index
    torch.testing.assert_close(saved["images"], expected, rtol=0, atol=1e-3)
    random_start = torch.load(tmp_path / "real" / "distilled.pt")["images"]
    assert not torch.allclose(random_start, saved["images"], atol=0.05)   # --init real starts elsewhere


def test_a_preset_used_at_another_ipc_than_it_was_measured_at_says_so(tiny_idx, tmp_path, capsys):
    from clpdd_fast.config import PRESET_IPC, PRESETS
    assert set(PRESET_IPC) == set(PRESETS)
    cache = tmp_path / "cache"
    main(run_args(tiny_idx, tmp_path / "a", cache, "--preset", "quality", "--iterations", "0", "--ipc", "2"))
    err = capsys.readouterr().err
    assert "note: this run uses --preset quality at --ipc 2" in err and "quality-ipc10 at --ipc 10" in err
    main(run_args(tiny_idx, tmp_path / "b", cache, "--preset", "quality", "--iterations", "0"))            # ipc 1
    assert "note: this run uses --preset" not in capsys.readouterr().err
    main(run_args(tiny_idx, tmp_path / "c", cache, "--preset", "quality-ipc10", "--iterations", "0", "--ipc", "2"))
    assert "note: this run uses --preset quality-ipc10 at --ipc 2" in capsys.readouterr().err
    saved = torch.load(tmp_path / "c" / "distilled.pt")["config"]
    assert (saved["outer"], saved["init"], saved["ipc"], saved["preset"]) == ("mse", "centroids", 2, "quality-ipc10")


def test_runs_written_with_the_old_setting_names_resume_evaluate_and_export(tiny_idx, tmp_path, capsys):
    """Files from before the renames (settings precision and chunk_size, now encoder_dtype and encoder_batch): evaluate
    and export read them and --resume continues them, comparing the old settings under their new names."""
    from safetensors import safe_open

    from clpdd_fast import evaluate, export
    run, cache = tmp_path / "r", tmp_path / "cache"
    main(run_args(tiny_idx, run, cache, "--iterations", "1", "--encoder-batch", "2"))
    for name in ("checkpoint.pt", "distilled.pt"):
        payload = torch.load(run / name, weights_only=True)
        config = payload["config"]
        config["precision"], config["chunk_size"] = config.pop("encoder_dtype"), config.pop("encoder_batch")
        torch.save(payload, run / name)
    capsys.readouterr()
    out = evaluate.main(["--distilled", str(run), "--device", "cpu", "--epochs", "1", "--seeds", "1",
                         "--aug-draws", "1"])
    assert out["image_size"] == 32
    export.main(["--distilled", str(run), "--format", "safetensors", str(tmp_path / "d.safetensors")])
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["encoder_batch"] == 2   # written under the new names
    err = capsys.readouterr().err
    assert err.count("reading the old setting name(s) chunk_size as encoder_batch, precision as encoder_dtype") == 2
    assert "unknown setting" not in err
    with pytest.raises(SystemExit, match="--encoder-batch was 2, now 3"):
        main(run_args(tiny_idx, run, cache, "--iterations", "2", "--resume", "--encoder-batch", "3"))
    assert main(run_args(tiny_idx, run, cache, "--iterations", "2", "--resume", "--chunk-size", "2"))["steps"] == 2
    err = capsys.readouterr().err
    assert "note: --chunk-size is now --encoder-batch" in err and "unknown setting" not in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["encoder_batch"] == 2


def test_a_run_builds_only_its_methods_inputs(tiny_idx, tmp_path, monkeypatch):
    """An LGM run never reads the real features: they are not transformed and copied to the device for it."""
    from clpdd_fast import distill
    from clpdd_fast.feature_transform import FeatureTransform

    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(FeatureTransform, "apply_chunked", lambda *a, **k: pytest.fail("LGM copied the real features"))
        lgm = distill.setup(distill.parse(run_args(tiny_idx, tmp_path / "lgm", cache, "--method", "lgm")))
    assert lgm.inputs.clpdd is None and lgm.inputs.lgm.augs_per_batch == 10
    clpdd = distill.setup(distill.parse(run_args(tiny_idx, tmp_path / "clpdd", cache)))
    assert clpdd.inputs.lgm is None and clpdd.inputs.clpdd.real_features.shape == (48, clpdd.exp.encoder.feature_dim)
