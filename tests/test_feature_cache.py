"""The memory-mapped real-feature cache: reuse, fingerprints, corruption, resumption, left-out images."""
import os

import pytest
import torch

from clpdd_fast import feature_cache
from clpdd_fast.datasets import BadImageError, open_dataset
from clpdd_fast.feature_cache import FeatureCacheError, cache_path, load_or_extract_features, read_cache_header
from image_files import write_broken_tree, write_idx_set


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
    write_idx_set(root, n_train=23, n_test=6)
    return open_dataset(str(root), "train")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cache_extracts_then_reuses(tmp_path, idx_ds, dtype):
    enc = CountingEncoder()
    feats, labels = load_or_extract_features(enc, idx_ds, 8, str(tmp_path / "c"), dtype=dtype, encoder_batch=5,
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
        load_or_extract_features(crash, idx_ds, 8, str(tmp_path), encoder_batch=4, progress=False)
    names = sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock"))
    assert [n.rsplit(".", 1)[-1] for n in names] == ["partial", "progress"]  # no final file exists yet
    enc = CountingEncoder()
    feats, _ = load_or_extract_features(enc, idx_ds, 8, str(tmp_path), encoder_batch=4, progress=True)
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
    fp_a = feature_cache.cache_fingerprint(enc, idx_ds, 8, torch.float16)
    fp_b = feature_cache.cache_fingerprint(enc, idx_ds, 8, torch.bfloat16)
    assert cache_path(str(tmp_path), fp_a) != cache_path(str(tmp_path), fp_b)
    assert fp_a["dataset.split"] == "train" and fp_a["dataset.kind"] == "idx"


def test_cache_with_real_frozen_encoder(tmp_path, idx_ds):
    from clpdd_fast.encoders import build_encoder

    enc = build_encoder("test_efficientnet", weights="none")
    feats, _ = load_or_extract_features(enc, idx_ds, 16, str(tmp_path), encoder_batch=8, progress=False)
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
        results.append(load_or_extract_features(enc, idx_ds, 8, str(tmp_path), encoder_batch=4, progress=False)[0])

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and enc.calls == 6  # one extraction of ceil(23 / 4) batches, not three
    assert all(torch.equal(r, results[0]) for r in results)
    assert len(os.listdir(tmp_path)) == 1


# ------------------------------------------------------------------------------------- undecodable images (skipping)
def _kept(bad, n=17):
    return [r for r in range(n) if r not in bad]


def test_cache_bad_image_stops_extraction_then_skip_resumes_it(tmp_path, capsys):
    """Without skip_bad_images the first bad file stops the extraction (named, with the way out); with it the same
    partial file is resumed, the bad rows are left out of features, labels and rows alike, and the file lists them."""
    root = tmp_path / "tree"
    bad = write_broken_tree(root)
    ds = open_dataset(str(root), "train")
    cache = tmp_path / "cache"
    enc = CountingEncoder()
    with pytest.raises(BadImageError, match="b/02.png.*--skip-bad-images.*resumes at row 8"):
        load_or_extract_features(enc, ds, 8, str(cache), encoder_batch=4, progress=False)
    assert enc.calls == 2  # rows 0-7 were extracted before the bad file (row 8) was reached
    assert sorted(n.rsplit(".", 1)[-1] for n in os.listdir(cache) if not n.endswith(".lock")) == ["partial",
                                                                                                   "progress"]
    capsys.readouterr()
    enc.calls = 0
    feats, labels, rows = load_or_extract_features(enc, ds, 8, str(cache), encoder_batch=4, progress=False,
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
    bad = write_broken_tree(root)
    ds = open_dataset(str(root), "train")
    subset = [16, 3, 8, 9, 1, 12, 0, 5, 7]

    class Crashing(CountingEncoder):
        def forward(self, x):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().forward(x)

    crash = Crashing()
    with pytest.raises(KeyboardInterrupt):  # batches [16, 3] and [8, 9] (16 and 8 left out) done, then a crash
        load_or_extract_features(crash, ds, 8, str(tmp_path / "c"), encoder_batch=2, indices=subset, progress=False,
                                 skip_bad_images=True)
    enc = CountingEncoder()
    with pytest.raises(FeatureCacheError, match="left out 2 undecodable.*b/02.png.*--skip-bad-images"):
        load_or_extract_features(enc, ds, 8, str(tmp_path / "c"), encoder_batch=2, indices=subset, progress=False)
    feats, labels, rows = load_or_extract_features(enc, ds, 8, str(tmp_path / "c"), encoder_batch=2, indices=subset,
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
    bad = write_broken_tree(root)
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
