"""Files users exchange (distilled sets, checkpoints, weights) are loaded without running code from them."""
import argparse
import subprocess
import sys

import pytest
import torch

from clpdd_fast import artifacts, evaluate, weights
from clpdd_fast.distill import main as distill_main

from helpers import TINY_MODEL, run_args


class RunsCode:
    """Unpickling this calls exec(code): what a crafted file can make an unsafe torch.load do."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return exec, (self.code,)


def armed(path, obj, marker):
    """Save obj to path and show that unpickling it the unsafe way does run its code (then clear the marker)."""
    torch.save(obj, path)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


def test_evaluate_refuses_a_distilled_set_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = armed(tmp_path / "distilled.pt", {"images": torch.rand(4, 3, 8, 8), "labels": torch.arange(4),
                                             "config": {"model": TINY_MODEL, "hook": RunsCode(marker)}}, marker)
    with pytest.raises(ValueError, match=r"--distilled: refusing to load .*could run code.*exec"):
        evaluate.main(["--distilled", str(path), "--device", "cpu"])
    assert not marker.exists()


def test_evaluate_command_line_refuses_it_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = armed(tmp_path / "distilled.pt", {"images": torch.rand(4, 3, 8, 8), "labels": torch.arange(4),
                                             "config": {"hook": RunsCode(marker)}}, marker)
    proc = subprocess.run([sys.executable, "-m", "clpdd_fast.evaluate", "--distilled", str(tmp_path),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --distilled: refusing to load"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_idx, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "run").mkdir()
    armed(tmp_path / "run" / "checkpoint.pt", {"step": 1, "synthetic": {}, "optimizer": {}, "generator": None,
                                               "torch_rng": None, "config": {"lr": RunsCode(marker)}}, marker)
    with pytest.raises(ValueError, match="--resume: refusing to load"):
        distill_main(run_args(tiny_idx, tmp_path / "run", tmp_path / "cache", "--iterations", "2", "--resume"))
    assert not marker.exists()


def test_weights_that_would_run_code_are_refused_before_timm_reads_them(tmp_path):
    marker = tmp_path / "ran"
    path = armed(tmp_path / "w.pth", {"conv.weight": torch.rand(2, 2), "extra": RunsCode(marker)}, marker)
    with pytest.raises(ValueError, match="weights: refusing to load"):
        weights.read_state_dict(str(path))
    with pytest.raises(ValueError, match="weights: refusing to load"):  # the path timm's own loader takes
        weights.timm_model_from_file(TINY_MODEL, str(path), {})
    assert not marker.exists()


def test_plain_records_still_load(tmp_path):
    """What the tools write, and timm train.py checkpoints (their arguments as an argparse.Namespace), still load."""
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": {"module.w": torch.ones(3)}},
               tmp_path / "timm.pth")
    assert list(weights.read_state_dict(str(tmp_path / "timm.pth"))) == ["w"]
    record = {"images": torch.rand(2, 3, 4, 4), "labels": torch.tensor([0, 1]),
              "config": {"ipc": 1, "lr": 0.05, "class_names": ["a", "b"], "data": None, "decorrelate": True}}
    artifacts.save_torch(record, tmp_path / "distilled.pt")
    back = artifacts.load_torch(tmp_path / "distilled.pt", "--distilled", {"images", "labels", "config"})
    assert back["config"] == record["config"] and torch.equal(back["images"], record["images"])


def test_unreadable_and_foreign_files_name_the_argument(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"step": 2, "config": {}}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ValueError, match="--resume: could not read .*cut.pt"):
        artifacts.load_torch(tmp_path / "cut.pt", "--resume", {"step"})
    with pytest.raises(ValueError, match=r"--resume: .*expected a dict with config, step, synthetic; found "
                                         r"\['config', 'step'\]"):
        artifacts.load_torch(good, "--resume", {"step", "config", "synthetic"})
