"""Datasets: IDX files, ImageFolder trees, the embedded default, undecodable images."""
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpdd_fast import datasets as datasets_mod
from clpdd_fast.datasets import BadImageError, IdxDataset, ImageFolderDataset, open_dataset, read_idx, write_idx
from image_files import write_broken_tree, write_idx_set


# ------------------------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "d", gz=gz)
    imgs, labels = arrays["train"]
    suffix = ".gz" if gz else ""
    raw = open(tmp_path / "d" / f"train-images-idx3-ubyte{suffix}", "rb").read()
    if gz:
        raw = gzip.decompress(raw)
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], "big") == 12  # the IDX header
    assert np.array_equal(read_idx(str(tmp_path / "d" / f"train-images-idx3-ubyte{suffix}")), imgs)
    ds = open_dataset(str(tmp_path / "d"), "train")
    assert isinstance(ds, IdxDataset) and len(ds) == 12 and ds.num_classes == 3
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    x = ds.images([0, 5], 8)  # native size: exact pixels
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(imgs[[0, 5]]).float() / 255)
    assert torch.equal(x[:, 0], x[:, 2])
    big = ds.images(torch.tensor([1]), 20)
    ref = F.interpolate(torch.from_numpy(imgs[[1]]).float()[:, None] / 255, size=(20, 20), mode="bilinear",
                        align_corners=False, antialias=True).clamp(0, 1)
    assert big.shape == (1, 3, 20, 20) and torch.allclose(big[:, :1], ref)
    assert 0 <= float(big.min()) and float(big.max()) <= 1
    for split in ("test", "val"):
        t = open_dataset(str(tmp_path / "d"), split)
        assert len(t) == 6 and t.split == "test"


def test_idx_wider_dtype_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(str(tmp_path / "x.idx"), arr)
    assert np.array_equal(read_idx(str(tmp_path / "x.idx")), arr)


def test_idx_corrupt_and_truncated(tmp_path):
    write_idx_set(tmp_path / "d", gz=False)
    p = tmp_path / "d" / "train-images-idx3-ubyte"
    raw = p.read_bytes()
    p.write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(p))
    p.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(p))
    g = tmp_path / "bad.gz"
    g.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(str(g))


def test_idx_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path / "d", gz=False)
    write_idx(str(tmp_path / "d" / "train-labels-idx1-ubyte"), np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="match"):
        open_dataset(str(tmp_path / "d"), "train")


def test_default_dataset(monkeypatch, tmp_path):
    if os.path.isdir(datasets_mod.DEFAULT_DATA):
        ds = open_dataset(None, "test")
        assert len(ds) == 10000 and ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
        assert ds.images([0], 32).shape == (1, 3, 32, 32)
    monkeypatch.setattr(datasets_mod, "DEFAULT_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        open_dataset(None, "train")


def test_bad_split_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data"):
        open_dataset(str(tmp_path / "nope"), "train")
    with pytest.raises(ValueError, match="split"):
        open_dataset(str(tmp_path), "dev")
    with pytest.raises(FileNotFoundError, match="neither"):
        open_dataset(str(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------- ImageFolder
def _png(path, w, h, color, mode="RGB"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (w, h), color).save(path)


def _folder(root):
    # class order must follow sorted folder names, not creation order
    _png(root / "train" / "zebra" / "a.png", 12, 8, (255, 0, 0))
    _png(root / "train" / "zebra" / "b.png", 8, 8, (0, 255, 0))
    _png(root / "train" / "apple" / "x.png", 6, 10, 128, mode="L")
    _png(root / "val" / "apple" / "y.png", 10, 10, (0, 0, 255))
    _png(root / "val" / "zebra" / "z.png", 10, 10, (10, 20, 30))
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")


def test_imagefolder_shapes_labels_order(tmp_path):
    _folder(tmp_path)
    ds = open_dataset(str(tmp_path), "train")
    assert isinstance(ds, ImageFolderDataset)
    assert ds.class_names == ["apple", "zebra"] and ds.num_classes == 2 and len(ds) == 3
    assert ds.labels.tolist() == [0, 1, 1]
    x = ds.images([0, 1, 2], 4)
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((3, 4, 4), 128 / 255))  # grayscale -> 3 equal channels
    assert torch.allclose(x[1, 0], torch.ones(4, 4)) and float(x[1, 1:].abs().max()) == 0  # red, resized + cropped
    val = open_dataset(str(tmp_path), "val")
    assert val.labels.tolist() == [0, 1] and val.class_names == ds.class_names
    assert torch.allclose(val.images([1], 3)[0, :, 1, 1], torch.tensor([10, 20, 30]) / 255.0)
    assert ds.fingerprint != val.fingerprint and ds.fingerprint["kind"] == "imagefolder"


def test_imagefolder_centre_crop(tmp_path):
    from PIL import Image

    img = np.zeros((4, 12, 3), np.uint8)  # wide image: left third red, middle green, right third blue
    img[:, :4, 0] = 255
    img[:, 4:8, 1] = 255
    img[:, 8:, 2] = 255
    os.makedirs(tmp_path / "train" / "c")
    Image.fromarray(img).save(tmp_path / "train" / "c" / "i.png")
    x = open_dataset(str(tmp_path), "train").images([0], 4)  # shorter side 4 already: crop the middle 4 columns
    assert torch.allclose(x[0, 1], torch.ones(4, 4)) and float(x[0, 0].max()) == 0 and float(x[0, 2].max()) == 0


def test_imagefolder_class_order_is_sorted(tmp_path):
    names = ["kiwi", "fig", "date", "cherry", "banana", "apple", "elder"]
    for i, n in enumerate(names):  # created out of order; directory listing order is arbitrary
        _png(tmp_path / "train" / n / f"{i}.png", 4, 4, (i * 30, 0, 0))
    ds = open_dataset(str(tmp_path), "train")
    assert ds.class_names == sorted(names)
    for row, label in enumerate(ds.labels.tolist()):
        i = names.index(ds.class_names[label])
        assert ds.paths[row] == os.path.join(ds.class_names[label], f"{i}.png")
        assert abs(float(ds.images([row], 4)[0, 0, 0, 0]) - i * 30 / 255) < 1e-6


def test_imagefolder_empty_class_folder(tmp_path):
    _folder(tmp_path)
    os.makedirs(tmp_path / "train" / "empty_class")
    with pytest.raises(ValueError, match="empty_class"):
        open_dataset(str(tmp_path), "train")


def test_imagefolder_missing_split(tmp_path):
    _png(tmp_path / "train" / "a" / "1.png", 4, 4, (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="val"):
        open_dataset(str(tmp_path), "val")


# ------------------------------------------------------------------------------------------ undecodable images
def test_imagefolder_undecodable_image_is_named_or_left_out(tmp_path):
    bad = write_broken_tree(tmp_path)
    ds = open_dataset(str(tmp_path), "train")
    assert len(ds) == 17
    for row, path in bad.items():
        with pytest.raises(BadImageError, match=path) as exc:
            ds.images([0, row], 8)
        assert exc.value.row == row and exc.value.path == path
    images, errors = ds.images_skipping_bad(list(range(17)), 8)
    good = [r for r in range(17) if r not in bad]
    assert [(e.row, e.path) for e in errors] == sorted(bad.items())
    assert torch.equal(images, ds.images(good, 8))  # the decodable rows, in order
