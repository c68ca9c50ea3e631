"""Run outputs: atomic writes, the metrics log across a resume, the image grid."""
import json

import pytest
import torch
from PIL import Image

from clpdd_fast import artifacts


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "config.json"
    artifacts.save_json({"a": 1}, path)

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind


def test_metrics_log_drops_rows_after_the_checkpoint_on_resume(tmp_path):
    log = artifacts.MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    artifacts.MetricsLog(tmp_path / "metrics.jsonl", keep_until_step=3).append({"step": 4, "loss": 9.0})
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0
    artifacts.MetricsLog(tmp_path / "metrics.jsonl")  # a new run starts an empty log
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_grid_has_one_row_per_class(tmp_path):
    images = torch.rand(6, 3, 40, 40)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    artifacts.save_grid_png(images, labels, ["a", "b", "c"], tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as img:
        assert img.height == 3 * (40 + 2)
        assert img.width > 2 * (40 + 2)


def test_metrics_log_resume_drops_a_cut_last_row_and_refuses_a_cut_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')  # killed mid-append
    artifacts.MetricsLog(path, keep_until_step=2).append({"step": 3, "loss": 0.125})
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.25}\n')
    with pytest.raises(ValueError, match="metrics.jsonl is corrupt"):
        artifacts.MetricsLog(path, keep_until_step=3)


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    from clpdd_fast import artifacts
    artifacts.save_json({"a": 1}, tmp_path / "x.json")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_load_distilled_raises_ordinary_errors_naming_the_argument(tmp_path):
    """A library call gets FileNotFoundError / ValueError (the CLIs turn them into an error line), never SystemExit."""
    with pytest.raises(FileNotFoundError, match="--set: .* is neither a distilled.pt file"):
        artifacts.load_distilled(str(tmp_path / "missing"), what="--set")
    path = tmp_path / "distilled.pt"
    torch.save({"images": torch.rand(3, 3, 8, 8), "labels": torch.arange(2), "config": {}}, path)
    with pytest.raises(ValueError, match=r"--set: images \(3, 3, 8, 8\) and labels \(2,\) do not form a set"):
        artifacts.load_distilled(str(tmp_path), what="--set")
    torch.save({"images": torch.rand(2, 3, 8, 8), "labels": torch.arange(2), "config": {"ipc": 1}}, path)
    loaded = artifacts.load_distilled(str(tmp_path), what="--set")
    assert loaded["path"] == str(path) and loaded["config"] == {"ipc": 1} and loaded["images"].shape == (2, 3, 8, 8)
