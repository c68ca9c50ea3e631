"""The on-disk real-feature cache: a frozen encoder's features of a dataset, extracted once, resumably.

`load_or_extract_features` keeps the features in a memory-mapped file whose header fingerprints everything that
determines them (encoder, weights, dataset, split, rows, resolution, preprocessing, dtype); a file that does not
match is never used silently (FeatureCacheError). Extraction can be interrupted at any point and resumes from the
last finished batch.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import zlib

import numpy as np
import torch
from torch import Tensor

from clpdd_fast import validation as check
from clpdd_fast.artifacts import save_json
from clpdd_fast.datasets import BadImageError, ImageDataset, digest
from clpdd_fast.progress import Progress
from clpdd_fast.scan import row_blocks

CACHE_FORMAT = "clpdd-feature-cache-v1"
_MAGIC = b"CLPDDFEAT1\n"
_HEADER_BYTES = 4096  # fixed preamble: magic + JSON header padded with spaces; data starts page-aligned after it
_STORAGE = {torch.float16: ("float16", np.float16), torch.bfloat16: ("bfloat16", np.uint16),
            torch.float32: ("float32", np.float32)}


class FeatureCacheError(ValueError):
    """A feature-cache file exists but does not match what was asked for, or is corrupt."""


def cache_fingerprint(encoder, dataset: ImageDataset, size: int, dtype: torch.dtype, indices=None) -> dict:
    """Everything that determines the cached features, as a dict of strings (shape included)."""
    if dtype not in _STORAGE:
        raise ValueError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    n = len(dataset) if indices is None else len(indices)
    rows = "all" if indices is None else "sha256:" + digest(np.asarray(indices, dtype="<i8").tobytes())
    fp = {"format": CACHE_FORMAT, "size": str(size), "dtype": _STORAGE[dtype][0], "rows": rows,
          "shape": f"{n},{encoder.feature_dim}", "preprocessing": dataset.preprocessing + ";encoder-normalize"}
    fp.update({f"encoder.{k}": str(v) for k, v in encoder.fingerprint.items()})
    fp.update({f"dataset.{k}": str(v) for k, v in dataset.fingerprint.items()})
    return fp


def cache_path(cache_dir: str, fingerprint: dict) -> str:
    """File name: readable parts + a hash of the full fingerprint, so different settings never share a file."""
    h = digest(json.dumps(fingerprint, sort_keys=True))[:16]
    model = fingerprint.get("encoder.model", "enc").replace("/", "_")
    name = f"features-{model}-{fingerprint['dataset.split']}-{fingerprint['size']}px-{fingerprint['dtype']}-{h}.bin"
    return os.path.join(os.path.abspath(cache_dir), name)


def _pack_header(header: dict) -> bytes:
    blob = _MAGIC + json.dumps(header, sort_keys=True).encode()
    if len(blob) > _HEADER_BYTES - 1:
        raise ValueError(f"feature-cache header too long ({len(blob)} bytes)")
    return blob + b" " * (_HEADER_BYTES - 1 - len(blob)) + b"\n"


def read_cache_header(path: str) -> dict:
    """The JSON header of a feature-cache file (raises FeatureCacheError if it is not one). A cache that leaves out
    undecodable images (skip_bad_images=True) lists them after its data; the list is returned under "skipped" (one
    dict per left-out row: index (its position among the requested rows), row (dataset row), path, error)."""
    with open(path, "rb") as f:
        blob = f.read(_HEADER_BYTES)
        if len(blob) < _HEADER_BYTES or not blob.startswith(_MAGIC):
            raise FeatureCacheError(f"feature cache {path!r} has no valid header (truncated or not a feature cache); "
                                    "delete it to re-extract, or use another --cache-dir")
        try:
            header = json.loads(blob[len(_MAGIC):].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FeatureCacheError(f"feature cache {path!r} has a corrupt header ({exc}); delete it to re-extract, "
                                    "or use another --cache-dir") from None
        header["skipped"] = []
        if header.get("skipped_images"):
            f.seek(header["skipped_offset"])
            listing = f.read(header["skipped_bytes"])
            if zlib.crc32(listing) != header["skipped_crc32"]:
                raise FeatureCacheError(f"feature cache {path!r}: its list of left-out images fails its checksum "
                                        "(truncated or corrupt); delete it to re-extract")
            header["skipped"] = json.loads(listing.decode())
    return header


def _open_memmap(path: str, np_dtype, shape, mode: str) -> np.memmap:
    return np.memmap(path, dtype=np_dtype, mode=mode, offset=_HEADER_BYTES, shape=shape)


def _as_tensor(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _crc(arr: np.ndarray, crc: int = 0) -> int:
    for rows in row_blocks(arr.shape[0]):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(arr[rows])).cast("B"), crc)
    return crc


def _validate_existing(path: str, expected: dict, shape, np_dtype, verify: bool) -> dict:
    """Check a finished cache file against what was asked for; returns its header."""
    header = read_cache_header(path)
    fp = header.get("fingerprint", {})
    diffs = [f"{k}: file has {fp.get(k)!r}, expected {v!r}" for k, v in expected.items() if fp.get(k) != v]
    diffs += [f"{k}: file has {fp[k]!r}, not expected" for k in fp if k not in expected]
    if diffs:
        raise FeatureCacheError(f"feature cache {path!r} was written for different settings ({'; '.join(diffs[:4])}"
                                f"{' ...' if len(diffs) > 4 else ''}); it will not be used. Delete it to re-extract, "
                                "or use another --cache-dir")
    if header.get("complete") is not True:
        raise FeatureCacheError(f"feature cache {path!r} lacks its completion marker (an interrupted write?); "
                                "delete it to re-extract")
    kept = shape[0] - len(header["skipped"])
    want = _HEADER_BYTES + int(np.prod(shape)) * np.dtype(np_dtype).itemsize + header.get("skipped_bytes", 0)
    got = os.path.getsize(path)
    if got != want or header.get("rows") != kept:
        raise FeatureCacheError(f"feature cache {path!r} is {got} bytes, expected {want} for shape {tuple(shape)} "
                                f"{expected['dtype']} (truncated or corrupt); delete it to re-extract")
    if verify:
        crc = _crc(_open_memmap(path, np_dtype, (kept, shape[1]), "r"))
        if crc != header.get("crc32"):
            raise FeatureCacheError(f"feature cache {path!r} fails its checksum (crc32 {crc:08x}, header says "
                                    f"{header.get('crc32')}); the data is corrupt: delete it to re-extract")
    return header


def _skipped_text(skipped: list, most: int = 5) -> str:
    names = ", ".join(f"{s['path']!r} ({s['error']})" for s in skipped[:most])
    return names + (f" and {len(skipped) - most} more" if len(skipped) > most else "")


def load_or_extract_features(encoder, dataset: ImageDataset, size: int, cache_dir: str, dtype=torch.float16,
                             batch_size: int = 256, device="cpu", indices=None, progress: bool = True,
                             verify: bool = True, skip_bad_images: bool = False, return_rows: bool = False):
    """Features of `dataset` (rows `indices`, default all) under the frozen `encoder` at `size` x `size`, cached on disk.

    encoder: a FrozenEncoder (anything with feature_dim, fingerprint, and __call__(images (B,3,size,size)) -> (B, d)).
    dtype: storage dtype, torch.float16 (default), torch.bfloat16 (stored as uint16 bits) or torch.float32.
    Returns (features (n, d) `dtype`, CPU, memory-mapped copy-on-write from the cache file; labels LongTensor (n,));
    with return_rows=True also the dataset rows (int64 numpy (n,)) that the features and labels belong to.

    An image file that cannot be decoded stops the extraction with a BadImageError naming it (the finished batches
    are kept: a rerun resumes there). skip_bad_images=True leaves such rows out instead: each is named in a warning
    and in the cache file, and the features, labels and rows returned hold only the other rows, in order. The
    setting is not part of the fingerprint, so a run with it resumes the partial extraction of a run without it;
    a cache that left images out is used only with skip_bad_images=True.

    Cache policy: the file name carries a hash of the full fingerprint (cache_fingerprint), so changed settings
    make a new file. An existing file with that name is used only if its header fingerprint, completion marker, size
    and (verify=True) crc32 all match; otherwise FeatureCacheError says what mismatched: nothing is rebuilt or
    overwritten silently. Extraction writes `<file>.partial` plus a `.progress` sidecar after every batch; an
    interrupted run resumes from the last completed batch, and the finished file is renamed into place atomically.
    """
    check.integer("batch_size", batch_size, minimum=1)
    rows = np.arange(len(dataset), dtype=np.int64) if indices is None else \
        np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        raise ValueError("indices: expected at least one row")
    expected = cache_fingerprint(encoder, dataset, size, dtype, None if indices is None else rows)
    np_dtype = _STORAGE[dtype][1]
    shape = (int(rows.size), int(encoder.feature_dim))
    path = cache_path(cache_dir, expected)

    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # One extractor per file: other processes (e.g. distributed ranks) wait here, then find the finished file.
        with open(path + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(path):
                    _extract(encoder, dataset, rows, size, dtype, batch_size, device, progress, path, expected, shape,
                             skip_bad_images)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            os.remove(path + ".lock")
        except FileNotFoundError:
            pass
    skipped = _validate_existing(path, expected, shape, np_dtype, verify)["skipped"]
    if skipped and not skip_bad_images:
        raise FeatureCacheError(f"feature cache {path!r} leaves out {len(skipped)} image(s) that could not be "
                                f"decoded: {_skipped_text(skipped)}; rerun with --skip-bad-images "
                                "(skip_bad_images=True) to use it without them")
    if skipped:
        print(f"warning: {len(skipped)} undecodable image(s) left out of the {expected['dataset.split']} features "
              f"(listed in {path}): {_skipped_text(skipped)}", file=sys.stderr, flush=True)
    keep = np.ones(rows.size, dtype=bool)
    keep[[s["index"] for s in skipped]] = False
    rows = rows[keep]
    features = _as_tensor(_open_memmap(path, np_dtype, (int(rows.size), shape[1]), "c"), dtype)
    labels = dataset.labels[torch.from_numpy(rows)]
    return (features, labels, rows) if return_rows else (features, labels)


def _extract(encoder, dataset, rows, size, dtype, batch_size, device, progress, path, expected, shape,
             skip_bad) -> None:
    """Fill `<path>.partial` batch by batch, then rename it to `path`. The decodable rows' features are written
    densely from the start of the data area; the rows left out (skip_bad) are listed in the `.progress` sidecar while
    extracting and, in the finished file, as JSON after the data area (the header holds its offset, size and crc32)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np_dtype = _STORAGE[dtype][1]
    partial, sidecar = path + ".partial", path + ".progress"
    done, written, crc, skipped = 0, 0, 0, []
    nbytes = _HEADER_BYTES + int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    if os.path.exists(partial) and os.path.exists(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                state = json.load(f)
            ok = (read_cache_header(partial).get("fingerprint") == expected and os.path.getsize(partial) >= nbytes
                  and state.get("fingerprint") == expected and 0 <= int(state["rows_done"]) <= shape[0]
                  and int(state.get("rows_written", state["rows_done"])) + len(state.get("skipped", []))
                  == int(state["rows_done"]))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            done, crc = int(state["rows_done"]), int(state["crc32"])
            written, skipped = int(state.get("rows_written", done)), list(state.get("skipped", []))
            if skipped and not skip_bad:
                raise FeatureCacheError(f"the interrupted extraction {partial!r} left out {len(skipped)} undecodable "
                                        f"image(s) ({_skipped_text(skipped)}); rerun with --skip-bad-images "
                                        "(skip_bad_images=True) to finish it, or delete it and its .progress file to "
                                        "start over")
            print(f"feature cache: resuming interrupted extraction at row {done}/{shape[0]} ({partial})",
                  file=sys.stderr)
        else:
            print(f"feature cache: discarding an unusable partial file {partial}", file=sys.stderr)
    if done == 0:
        with open(partial, "wb") as f:
            f.write(_pack_header({"fingerprint": expected, "complete": False}))
            f.truncate(nbytes)
        save_json({"fingerprint": expected, "rows_done": 0, "rows_written": 0, "crc32": 0, "skipped": []}, sidecar)
    out = _open_memmap(partial, np_dtype, shape, "r+")
    bar = Progress(shape[0], f"extracting {expected['encoder.model']} features ({expected['dataset.split']}, "
                              f"{size}px)", progress, initial=done)
    # Run on `device`; an encoder living elsewhere is moved there for the extraction and moved back afterwards.
    home = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
    home = home.device if home is not None else None
    if home is not None and home != torch.device(device):
        encoder.to(device)
    try:
        with torch.no_grad():
            for s in range(done, shape[0], batch_size):
                idx = rows[s:s + batch_size]
                if skip_bad:
                    images, bad = dataset.images_skipping_bad(idx, size)
                else:
                    try:
                        images, bad = dataset.images(idx, size), []
                    except BadImageError as err:
                        raise BadImageError(err.row, err.path, err.reason,
                                            f"; rerun with --skip-bad-images (skip_bad_images=True) to leave "
                                            f"undecodable images out: the extraction resumes at row {s} of "
                                            f"{shape[0]}") from None
                bad = {err.row: err for err in bad}
                for j, r in enumerate(idx.tolist()):
                    if r in bad:
                        skipped.append({"index": s + j, "row": r, "path": bad[r].path, "error": bad[r].reason})
                        print(f"warning: skipping undecodable image {bad[r].path!r}: {bad[r].reason}",
                              file=sys.stderr, flush=True)
                k = images.shape[0]
                if k:
                    feats = encoder(images.to(device))
                    if tuple(feats.shape) != (k, shape[1]):
                        raise RuntimeError(f"encoder returned shape {tuple(feats.shape)}, expected {(k, shape[1])}")
                    feats = feats.to(dtype)
                    if not bool(torch.isfinite(feats).all()):
                        raise FeatureCacheError(f"features of rows {s}..{s + len(idx) - 1} are not finite in "
                                                f"{expected['dtype']} (overflow?); try dtype=torch.bfloat16 or "
                                                "float32")
                    block = feats.cpu()
                    block = block.view(torch.uint16) if dtype == torch.bfloat16 else block
                    out[written:written + k] = block.numpy()
                    crc = zlib.crc32(memoryview(np.ascontiguousarray(out[written:written + k])).cast("B"), crc)
                    written += k
                    out.flush()  # data reaches the file before the progress record says so
                save_json({"fingerprint": expected, "rows_done": s + len(idx), "rows_written": written, "crc32": crc,
                           "skipped": skipped}, sidecar)
                bar.update(len(idx))
    finally:
        bar.close()
        if home is not None and home != torch.device(device):
            encoder.to(home)
    del out
    if written == 0:
        raise BadImageError(skipped[0]["row"], skipped[0]["path"], skipped[0]["error"],
                            f"; none of the {shape[0]} images could be decoded")
    header = {"fingerprint": expected, "complete": True, "crc32": crc, "rows": written}
    listing = json.dumps(skipped).encode()
    if skipped:
        header |= {"skipped_images": len(skipped), "skipped_offset": nbytes, "skipped_bytes": len(listing),
                   "skipped_crc32": zlib.crc32(listing)}
    with open(partial, "r+b") as f:  # the list of left-out rows, then the completion marker, then the atomic rename
        if skipped:
            f.seek(nbytes)
            f.write(listing)
            f.truncate()
            f.seek(0)
        f.write(_pack_header(header))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    os.remove(sidecar)
