"""Datasets (IDX, ImageFolder, the embedded default) and the memory-mapped feature cache."""
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpdd_fast import data as data_mod
from clpdd_fast.data import (BadImageError, FeatureCacheError, IdxDataset, ImageFolderDataset, cache_path,
                             load_or_extract_features, open_dataset, read_cache_header, read_idx, write_idx)


# ------------------------------------------------------------------------------------------------------------- IDX
def _write_idx_set(root, n_train=12, n_test=6, h=8, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, h, h), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), imgs)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        arrays[prefix] = (imgs, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = _write_idx_set(tmp_path / "d", gz=gz)
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
    _write_idx_set(tmp_path / "d", gz=False)
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
    _write_idx_set(tmp_path / "d", gz=False)
    write_idx(str(tmp_path / "d" / "train-labels-idx1-ubyte"), np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="match"):
        open_dataset(str(tmp_path / "d"), "train")


def test_default_dataset(monkeypatch, tmp_path):
    if os.path.isdir(data_mod.DEFAULT_DATA):
        ds = open_dataset(None, "test")
        assert len(ds) == 10000 and ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
        assert ds.images([0], 32).shape == (1, 3, 32, 32)
    monkeypatch.setattr(data_mod, "DEFAULT_DATA", str(tmp_path / "absent"))
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


# --------------------------------------------------------------------------------------------------- feature cache
class CountingEncoder(torch.nn.Module):
    """A tiny deterministic 'encoder' that counts its forward calls."""

    def __init__(self, d=5, tag="w0"):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, d)
        self.feature_dim = d
        self.name = "counting"
        self.fingerprint = {"model": "counting", "weights": tag}
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.proj(x.mean(dim=(2, 3))) * 100.0


@pytest.fixture
def idx_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")  # outside tmp_path, which the cache tests use as the cache folder
    _write_idx_set(root, n_train=23, n_test=6)
    return open_dataset(str(root), "train")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cache_extracts_then_reuses(tmp_path, idx_ds, dtype):
    enc = CountingEncoder()
    feats, labels = load_or_extract_features(enc, idx_ds, 8, str(tmp_path / "c"), dtype=dtype, batch_size=5,
                                             progress=False)
    assert enc.calls == 5  # ceil(23 / 5) batches
    with torch.no_grad():  # same batching as the extraction, so fp32 results are bit-identical too
        ref = torch.cat([enc(idx_ds.images(range(s, min(s + 5, 23)), 8)) for s in range(0, 23, 5)])
    assert feats.shape == (23, 5) and feats.dtype == dtype
    assert torch.equal(feats, ref.to(dtype))  # exactly the encoder's output rounded to the storage dtype
    assert torch.equal(labels, idx_ds.labels)
    enc.calls = 0
    again, labels2 = load_or_extract_features(enc, idx_ds, 8, str(tmp_path / "c"), dtype=dtype, progress=False)
    assert enc.calls == 0 and torch.equal(again, feats) and torch.equal(labels2, labels)
    files = os.listdir(tmp_path / "c")
    assert len(files) == 1 and files[0].endswith(".bin")  # no leftover partial / progress files
    again[0, 0] = 7  # copy-on-write: the cache file is not modified through the returned tensor
    third, _ = load_or_extract_features(enc, idx_ds, 8, str(tmp_path / "c"), dtype=dtype, progress=False)
    assert torch.equal(third, feats)


def test_cache_subset_and_settings_get_separate_files(tmp_path, idx_ds):
    enc = CountingEncoder()
    sub, lab = load_or_extract_features(enc, idx_ds, 8, str(tmp_path), indices=[3, 1, 4], progress=False)
    full, _ = load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    assert torch.equal(sub, full[[3, 1, 4]]) and lab.tolist() == idx_ds.labels[[3, 1, 4]].tolist()
    load_or_extract_features(enc, idx_ds, 10, str(tmp_path), progress=False)
    load_or_extract_features(CountingEncoder(tag="w1"), idx_ds, 8, str(tmp_path), progress=False)
    assert len(os.listdir(tmp_path)) == 4


def _only_file(d):
    (f,) = [os.path.join(d, n) for n in os.listdir(d)]
    return f


def test_cache_mismatching_fingerprint_is_detected(tmp_path, idx_ds):
    enc = CountingEncoder()
    load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    path = _only_file(tmp_path)
    # Make the file claim other weights while keeping its name (what a stale or hand-copied file looks like).
    blob = open(path, "rb").read()
    patched = blob.replace(b'"encoder.weights": "w0"', b'"encoder.weights": "w9"')
    assert patched != blob and len(patched) == len(blob)
    open(path, "wb").write(patched)
    enc.calls = 0
    with pytest.raises(FeatureCacheError, match=r"(?i)encoder\.weights.*delete it"):
        load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    assert enc.calls == 0


def test_cache_truncated_file_is_detected(tmp_path, idx_ds):
    enc = CountingEncoder()
    load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    path = _only_file(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(FeatureCacheError, match="truncated"):
        load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatureCacheError, match="header"):
        load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)


def test_cache_corrupted_data_is_detected(tmp_path, idx_ds):
    enc = CountingEncoder()
    load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    path = _only_file(tmp_path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FeatureCacheError, match="checksum"):
        load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False)
    # verify=False skips only the checksum (size and header are still checked)
    load_or_extract_features(enc, idx_ds, 8, str(tmp_path), progress=False, verify=False)


def test_cache_resumes_after_interruption(tmp_path, idx_ds):
    class Crashing(CountingEncoder):
        def forward(self, x):
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().forward(x)

    crash = Crashing()
    with pytest.raises(KeyboardInterrupt):
        load_or_extract_features(crash, idx_ds, 8, str(tmp_path), batch_size=4, progress=False)
    names = sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock"))
    assert [n.rsplit(".", 1)[-1] for n in names] == ["partial", "progress"]  # no final file exists yet
    enc = CountingEncoder()
    feats, _ = load_or_extract_features(enc, idx_ds, 8, str(tmp_path), batch_size=4, progress=True)
    assert enc.calls == 3  # 6 batches in all; 3 were done before the crash
    with torch.no_grad():
        # in the extraction's batches of 4: a batch of another size may round differently
        assert torch.equal(feats, torch.cat([enc(idx_ds.images(range(i, min(i + 4, 23)), 8))
                                             for i in range(0, 23, 4)]).half())
    assert len(os.listdir(tmp_path)) == 1
    hdr = read_cache_header(_only_file(tmp_path))
    assert hdr["complete"] is True and hdr["fingerprint"]["shape"] == "23,5"


def test_cache_name_contains_fingerprint_hash(tmp_path, idx_ds):
    enc = CountingEncoder()
    fp_a = data_mod.cache_fingerprint(enc, idx_ds, 8, torch.float16)
    fp_b = data_mod.cache_fingerprint(enc, idx_ds, 8, torch.bfloat16)
    assert cache_path(str(tmp_path), fp_a) != cache_path(str(tmp_path), fp_b)
    assert fp_a["dataset.split"] == "train" and fp_a["dataset.kind"] == "idx"


def test_cache_with_real_frozen_encoder(tmp_path, idx_ds):
    from clpdd_fast.encoders import build_encoder

    enc = build_encoder("test_efficientnet", weights="none")
    feats, _ = load_or_extract_features(enc, idx_ds, 16, str(tmp_path), batch_size=8, progress=False)
    with torch.no_grad():
        ref = enc(idx_ds.images(range(len(idx_ds)), 16))
    assert feats.shape == (23, enc.feature_dim)
    assert torch.allclose(feats.float(), ref, rtol=1e-3, atol=1e-3)
    assert read_cache_header(_only_file(tmp_path))["fingerprint"]["encoder.weights"] == "random-init-seed0"


def test_cache_concurrent_callers_extract_once(tmp_path, idx_ds):
    import threading

    enc = CountingEncoder()
    results = []

    def work():
        results.append(load_or_extract_features(enc, idx_ds, 8, str(tmp_path), batch_size=4, progress=False)[0])

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and enc.calls == 6  # one extraction of ceil(23 / 4) batches, not three
    assert all(torch.equal(r, results[0]) for r in results)
    assert len(os.listdir(tmp_path)) == 1


# ------------------------------------------------------------------------------------- undecodable images (skipping)
def _broken_tree(root, seed=0):
    """An ImageFolder train split of 17 random-noise images of odd sizes in classes a (6), b (5), c (6); rows 8 (a
    truncated PNG), 12 (a truncated JPEG) and 16 (not an image) cannot be decoded. Returns {row: path}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bad = {8: ("b", "02.png", "png"), 12: ("c", "01.jpg", "jpeg"), 16: ("c", "05.png", "text")}
    row = 0
    for name, n in (("a", 6), ("b", 5), ("c", 6)):
        os.makedirs(root / "train" / name, exist_ok=True)
        for i in range(n):
            _, fname, kind = bad.get(row, (name, f"{i:02d}.{'jpg' if i % 2 else 'png'}", None))
            path = root / "train" / name / fname
            pixels = rng.integers(0, 256, size=(int(rng.integers(7, 15)), int(rng.integers(7, 15)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, "JPEG" if fname.endswith(".jpg") else "PNG")
            if kind == "text":
                path.write_bytes(b"this is not an image")
            elif kind is not None:
                raw = path.read_bytes()
                path.write_bytes(raw[:len(raw) // 2])
            row += 1
    return {r: str(root / "train" / c / f) for r, (c, f, _) in bad.items()}


def test_imagefolder_undecodable_image_is_named_or_left_out(tmp_path):
    bad = _broken_tree(tmp_path)
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


def _kept(bad, n=17):
    return [r for r in range(n) if r not in bad]


def test_cache_bad_image_stops_extraction_then_skip_resumes_it(tmp_path, capsys):
    """Without skip_bad_images the first bad file stops the extraction (named, with the way out); with it the same
    partial file is resumed, the bad rows are left out of features, labels and rows alike, and the file lists them."""
    root = tmp_path / "tree"
    bad = _broken_tree(root)
    ds = open_dataset(str(root), "train")
    cache = tmp_path / "cache"
    enc = CountingEncoder()
    with pytest.raises(BadImageError, match="b/02.png.*--skip-bad-images.*resumes at row 8"):
        load_or_extract_features(enc, ds, 8, str(cache), batch_size=4, progress=False)
    assert enc.calls == 2  # rows 0-7 were extracted before the bad file (row 8) was reached
    assert sorted(n.rsplit(".", 1)[-1] for n in os.listdir(cache) if not n.endswith(".lock")) == ["partial",
                                                                                                   "progress"]
    capsys.readouterr()
    enc.calls = 0
    feats, labels, rows = load_or_extract_features(enc, ds, 8, str(cache), batch_size=4, progress=False,
                                                   skip_bad_images=True, return_rows=True)
    assert enc.calls == 2  # resumed at row 8: batches 8-11 and 12-15; 16 alone is undecodable (no encoder call)
    err = capsys.readouterr().err
    assert "resuming" in err
    for path in bad.values():
        assert f"warning: skipping undecodable image {path!r}" in err
    assert "3 undecodable image(s) left out" in err
    good = _kept(bad)
    assert rows.tolist() == good and labels.tolist() == ds.labels[good].tolist()
    with torch.no_grad():
        ref = enc(ds.images(good, 8)).half()
    assert feats.shape == (14, 5)
    torch.testing.assert_close(feats, ref, rtol=1e-3, atol=1e-2)
    (final,) = [os.path.join(cache, n) for n in os.listdir(cache) if n.endswith(".bin")]
    header = read_cache_header(final)
    assert header["complete"] is True and header["rows"] == 14
    assert [(s["index"], s["row"], s["path"]) for s in header["skipped"]] == [(r, r, p) for r, p in sorted(bad.items())]
    assert all(s["error"] for s in header["skipped"])
    # The finished cache is reused as it is, only where leaving images out was asked for.
    enc.calls = 0
    with pytest.raises(FeatureCacheError, match="leaves out 3 image.*--skip-bad-images"):
        load_or_extract_features(enc, ds, 8, str(cache), progress=False)
    again, labels2 = load_or_extract_features(enc, ds, 8, str(cache), progress=False, skip_bad_images=True)
    assert enc.calls == 0 and torch.equal(again, feats) and torch.equal(labels2, labels)


def test_cache_skipping_subset_rows_and_interrupted_extraction(tmp_path):
    """A subset in any order: positions and dataset rows of the left-out images are both recorded; a crash after
    some rows were left out resumes with the list intact, and only with skip_bad_images=True."""
    root = tmp_path / "tree"
    bad = _broken_tree(root)
    ds = open_dataset(str(root), "train")
    subset = [16, 3, 8, 9, 1, 12, 0, 5, 7]

    class Crashing(CountingEncoder):
        def forward(self, x):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().forward(x)

    crash = Crashing()
    with pytest.raises(KeyboardInterrupt):  # batches [16, 3] and [8, 9] (16 and 8 left out) done, then a crash
        load_or_extract_features(crash, ds, 8, str(tmp_path / "c"), batch_size=2, indices=subset, progress=False,
                                 skip_bad_images=True)
    enc = CountingEncoder()
    with pytest.raises(FeatureCacheError, match="left out 2 undecodable.*b/02.png.*--skip-bad-images"):
        load_or_extract_features(enc, ds, 8, str(tmp_path / "c"), batch_size=2, indices=subset, progress=False)
    feats, labels, rows = load_or_extract_features(enc, ds, 8, str(tmp_path / "c"), batch_size=2, indices=subset,
                                                   progress=False, skip_bad_images=True, return_rows=True)
    assert enc.calls == 3  # [1, 12], [0, 5], [7]
    good = [r for r in subset if r not in bad]
    assert rows.tolist() == good and labels.tolist() == ds.labels[good].tolist()
    with torch.no_grad():
        torch.testing.assert_close(feats, enc(ds.images(good, 8)).half(), rtol=1e-3, atol=1e-2)
    (final,) = [os.path.join(tmp_path / "c", n) for n in os.listdir(tmp_path / "c") if n.endswith(".bin")]
    skipped = read_cache_header(final)["skipped"]
    assert [(s["index"], s["row"], s["path"]) for s in skipped] == [(0, 16, bad[16]), (2, 8, bad[8]),
                                                                     (5, 12, bad[12])]


def test_cache_left_out_list_is_checked_and_all_bad_is_an_error(tmp_path):
    root = tmp_path / "tree"
    bad = _broken_tree(root)
    ds = open_dataset(str(root), "train")
    enc = CountingEncoder()
    load_or_extract_features(enc, ds, 8, str(tmp_path / "c"), progress=False, skip_bad_images=True)
    path = _only_file(tmp_path / "c")
    with open(path, "r+b") as f:  # damage the list of left-out images at the end of the file
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(FeatureCacheError, match="left-out images fails its checksum"):
        load_or_extract_features(enc, ds, 8, str(tmp_path / "c"), progress=False, skip_bad_images=True)
    with pytest.raises(BadImageError, match="none of the 2 images"):
        load_or_extract_features(enc, ds, 8, str(tmp_path / "d"), indices=[16, 8], progress=False,
                                 skip_bad_images=True)
