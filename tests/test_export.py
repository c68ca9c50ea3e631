"""Exporting a distilled set: the ImageFolder tree and the safetensors file load back without this package."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.datasets import ImageFolder

from clpdd_fast import artifacts, export, formats
from clpdd_fast.cli import run_main
from clpdd_fast.config import RunConfig

# Alphabetical order differs from label order, and "10_..." sorts before "2_..." without zero-padding.
NAMES = ["zebra", "T-shirt/top", "Äpfel ☕", "a b", "..", "", "back\\slash", "x" * 300, "ko:lon", "b", "a",
         "ü" * 200]


def a_set(seed=0, m=29, size=13, num_classes=len(NAMES)):
    """Random images (with exact 0s and 1s) and shuffled labels; class 1 has 11 images (two-digit file numbers)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(m, 3, size, size, generator=g)
    images[0, 0, :2] = 0.0
    images[1, 1, :2] = 1.0
    labels = torch.cat([torch.full((11,), 1), torch.randint(num_classes, (m - 11,), generator=g)])
    labels = labels[torch.randperm(m, generator=g)]
    return images, labels


def in_imagefolder_order(labels):
    """The original positions in the order ImageFolder lists them: by label, then by position within the class."""
    return sorted(range(len(labels)), key=lambda i: (int(labels[i]), i))


def test_imagefolder_round_trip(tmp_path):
    images, labels = a_set()
    out = formats.write_imagefolder(images, labels, NAMES, tmp_path / "set")
    ds = ImageFolder(str(out), allow_empty=True)
    assert len(ds.classes) == len(NAMES)
    assert [int(name.split("_", 1)[0]) for name in ds.classes] == list(range(len(NAMES)))
    assert ds.classes[1] == "01_T-shirt_top" and ds.classes[2] == "02_Äpfel__"
    order = in_imagefolder_order(labels)
    assert ds.targets == [int(labels[i]) for i in order]
    expected = np.rint(images.numpy().astype(np.float64) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for k, i in enumerate(order):
        image, target = ds[k]
        assert image.mode == "RGB" and target == int(labels[i])
        np.testing.assert_array_equal(np.asarray(image), expected[i])
    assert json.loads((out / "class_names.json").read_text(encoding="utf-8")) == NAMES
    assert not list(tmp_path.glob(".*"))   # no temporary folder left beside it


def test_folder_names_are_safe_unique_and_sort_in_label_order():
    folders = formats.folder_names(NAMES)
    assert sorted(folders) == folders and len(set(folders)) == len(folders)
    for name in folders:
        assert "/" not in name and "\\" not in name and ":" not in name and " " not in name
        assert len(name.encode("utf-8")) < 255 and name not in (".", "..")
    assert folders[1] == "01_T-shirt_top" and folders[4] == "04_.." and folders[5] == "05_"
    assert formats.folder_names(["a"] * 3) == ["0_a", "1_a", "2_a"]


def test_safetensors_round_trip(tmp_path):
    images, labels = a_set(1)
    config = RunConfig(class_names=NAMES, num_classes=len(NAMES), ipc=3, lr=0.0123).to_dict()
    path = formats.write_safetensors(images, labels, NAMES, config, tmp_path / "set.safetensors")
    loaded = load_file(str(path))
    assert loaded["images"].dtype == torch.float32 and loaded["labels"].dtype == torch.int64
    assert torch.equal(loaded["images"].view(torch.int32), images.view(torch.int32))  # bitwise
    assert torch.equal(loaded["labels"], labels.long())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == config and json.loads(meta["class_names"]) == NAMES
    assert meta["format_version"] == formats.FORMAT_VERSION


def distilled_run(tmp_path, class_names=NAMES, seed=2):
    images, labels = a_set(seed)
    config = RunConfig(class_names=class_names, num_classes=len(NAMES), image_size=13).to_dict()
    run = tmp_path / "run"
    run.mkdir()
    artifacts.save_torch({"images": images, "labels": labels, "config": config}, run / "distilled.pt")
    return run, images, labels, config


def test_cli_writes_both_formats(tmp_path, capsys):
    run, images, labels, config = distilled_run(tmp_path)
    export.main(["--distilled", str(run), "--format", "imagefolder", str(tmp_path / "tree")])
    ds = ImageFolder(str(tmp_path / "tree"), allow_empty=True)
    assert ds.targets == sorted(labels.tolist())
    export.main(["--distilled", str(run / "distilled.pt"), "--format", "safetensors", str(tmp_path / "d.safetensors")])
    loaded = load_file(str(tmp_path / "d.safetensors"))
    assert torch.equal(loaded["images"], images) and torch.equal(loaded["labels"], labels)
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == config
    assert "note:" not in capsys.readouterr().err


def test_cli_names_classes_by_number_when_the_run_has_no_names(tmp_path, capsys):
    run, _, labels, _ = distilled_run(tmp_path, class_names=None)
    export.main(["--distilled", str(run), "--format", "imagefolder", str(tmp_path / "tree")])
    assert "names no classes" in capsys.readouterr().err
    ds = ImageFolder(str(tmp_path / "tree"), allow_empty=True)
    assert ds.classes == [f"{k:02d}_{k}" for k in range(len(NAMES))]
    assert ds.targets == sorted(labels.tolist())


def test_force_replaces_an_earlier_export_only(tmp_path):
    images, labels = a_set(3)
    out = tmp_path / "tree"
    formats.write_imagefolder(images, labels, NAMES, out)
    with pytest.raises(ValueError, match="not empty; pass --force"):
        formats.write_imagefolder(images, labels, NAMES, out)
    few = torch.tensor([0, 1, 1])
    formats.write_imagefolder(images[:3], few, ["p", "q"], out, force=True)   # no stale classes remain
    assert ImageFolder(str(out)).classes == ["0_p", "1_q"] and ImageFolder(str(out)).targets == [0, 1, 1]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="only a folder that an earlier export wrote"):
        formats.write_imagefolder(images, labels, NAMES, mine, force=True)
    assert (mine / "thesis.tex").read_text() == "keep me"
    path = tmp_path / "s.safetensors"
    formats.write_safetensors(images, labels, NAMES, {}, path)
    with pytest.raises(ValueError, match="exists; pass --force"):
        formats.write_safetensors(images, labels, NAMES, {}, path)


def test_a_crash_leaves_no_partial_tree_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    images, labels = a_set(4)
    out = tmp_path / "tree"
    formats.write_imagefolder(images[:3], torch.tensor([0, 1, 1]), ["p", "q"], out)
    written = []
    real_write = formats._write_png

    def failing(pixels, path):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(path)
        real_write(pixels, path)
    monkeypatch.setattr(formats, "_write_png", failing)
    with pytest.raises(OSError, match="disk full"):
        formats.write_imagefolder(images, labels, NAMES, out, force=True)
    with pytest.raises(OSError, match="disk full"):
        formats.write_imagefolder(images, labels, NAMES, tmp_path / "new")
    assert ImageFolder(str(out)).targets == [0, 1, 1]   # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


@pytest.mark.parametrize("bad,message", [
    (lambda im, lb: (im * 2, lb), "images: expected finite values in"),
    (lambda im, lb: (im, lb + len(NAMES)), r"labels: labels must lie in \[0, 12\)"),
    (lambda im, lb: (im, lb.float()), "labels: expected an integer tensor"),
    (lambda im, lb: (im[:, :1], lb), "images: expected a float tensor of shape"),
])
def test_bad_sets_are_refused(tmp_path, bad, message):
    images, labels = bad(*a_set(5))
    with pytest.raises(ValueError, match=message):
        formats.write_imagefolder(images, labels, NAMES, tmp_path / "tree")
    with pytest.raises(ValueError, match=message):
        formats.write_safetensors(images, labels, NAMES, {}, tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())


def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: export.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "python -m clpdd_fast.export: error:"))]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_bad_input(tmp_path, capsys):
    run, *_ = distilled_run(tmp_path)
    assert "neither a distilled.pt" in cli_error(capsys, ["--distilled", str(tmp_path / "nowhere"), "--format",
                                                         "imagefolder", str(tmp_path / "o")])
    assert "invalid choice: 'png'" in cli_error(capsys, ["--distilled", str(run), "--format", "png",
                                                         str(tmp_path / "o")])
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    assert "not empty; pass --force" in cli_error(capsys, ["--distilled", str(run), "--format", "imagefolder",
                                                           str(full)])
    assert "is a folder" in cli_error(capsys, ["--distilled", str(run), "--format", "safetensors", str(full)])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    assert "--distilled: could not read" in cli_error(capsys, ["--distilled", str(garbage), "--format",
                                                               "safetensors", str(tmp_path / "s")])


def test_command_line_reports_bad_input_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clpdd_fast.export", "--distilled", str(tmp_path / "nowhere"),
                           "--format", "safetensors", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --distilled")


def test_readme_loading_example_runs(tmp_path, monkeypatch):
    """The README's snippet loads what distill writes into a run folder, with torchvision and safetensors only."""
    import re
    from pathlib import Path

    images, labels = torch.rand(24, 3, 9, 9), torch.arange(24) % len(NAMES)   # every class: no empty folder
    config = RunConfig(class_names=NAMES).to_dict()
    run = tmp_path / "run"
    run.mkdir()
    artifacts.save_torch({"images": images, "labels": labels, "config": config}, run / "distilled.pt")
    export.main(["--distilled", str(run), "--format", "imagefolder", str(run / "distilled")])
    export.main(["--distilled", str(run), "--format", "safetensors", str(run / "distilled.safetensors")])
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"safetensors alone:\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.replace("runs/<run>", "run"), "README.md", "exec"), scope)
    assert scope["tree"].targets == sorted(labels.tolist()) and torch.equal(scope["images"], images)
    assert torch.equal(scope["labels"], labels) and scope["config"] == config and scope["names"] == NAMES
