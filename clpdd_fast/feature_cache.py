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
from contextlib import contextmanager
from dataclasses import dataclass, field

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


def cache_fingerprint(encoder, dataset: ImageDataset, image_size: int, dtype: torch.dtype, indices=None) -> dict:
    """Everything that determines the cached features, as a dict of strings (shape included)."""
    if dtype not in _STORAGE:
        raise ValueError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    n = len(dataset) if indices is None else len(indices)
    rows = "all" if indices is None else "sha256:" + digest(np.asarray(indices, dtype="<i8").tobytes())
    fp = {"format": CACHE_FORMAT, "size": str(image_size), "dtype": _STORAGE[dtype][0], "rows": rows,
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


def load_or_extract_features(encoder, dataset: ImageDataset, image_size: int, cache_dir: str, dtype=torch.float16,
                             encoder_batch: int = 256, device="cpu", indices=None, progress: bool = True,
                             verify: bool = True, skip_bad_images: bool = False, return_rows: bool = False):
    """Features of `dataset` (rows `indices`, default all) under the frozen `encoder` at `image_size` x `image_size`,
    cached on disk, encoded `encoder_batch` images at a time on `device`.

    encoder: a FrozenEncoder (anything with feature_dim, fingerprint, and __call__(images (B, 3, S, S)) -> (B, d)).
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
    check.integer("encoder_batch", encoder_batch, minimum=1)
    rows = np.arange(len(dataset), dtype=np.int64) if indices is None else \
        np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        raise ValueError("indices: expected at least one row")
    expected = cache_fingerprint(encoder, dataset, image_size, dtype, None if indices is None else rows)
    path = cache_path(cache_dir, expected)
    job = _Extraction(path, expected, rows, image_size, dtype, int(encoder.feature_dim), encoder_batch, device,
                      progress, skip_bad_images)
    if not os.path.exists(path):
        _extract_once(job, encoder, dataset)
    skipped = _validate_existing(path, expected, job.shape, _STORAGE[dtype][1], verify)["skipped"]
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
    features = _as_tensor(_open_memmap(path, _STORAGE[dtype][1], (int(rows.size), job.feature_dim), "c"), dtype)
    labels = dataset.labels[torch.from_numpy(rows)]
    return (features, labels, rows) if return_rows else (features, labels)


@dataclass
class _Extraction:
    """One extraction into `<path>.partial`: what was asked for, how to encode it, and how far it got (what the
    `.progress` sidecar records after every batch)."""
    path: str
    fingerprint: dict
    rows: np.ndarray            # the dataset rows asked for, in order
    image_size: int
    dtype: torch.dtype
    feature_dim: int
    encoder_batch: int
    device: object
    progress: bool
    skip_bad: bool
    done: int = 0               # rows asked for that are finished: encoded, or left out
    written: int = 0            # feature rows in the file (done less the rows left out), densely from the start
    crc: int = 0                # crc32 of the written feature rows
    skipped: list = field(default_factory=list)   # one dict per row left out: index, row, path, error

    @property
    def partial(self) -> str:
        return self.path + ".partial"

    @property
    def sidecar(self) -> str:
        return self.path + ".progress"

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.feature_dim

    @property
    def data_end(self) -> int:
        """Bytes of the header and the data area: where the finished file lists the rows left out."""
        return _HEADER_BYTES + int(np.prod(self.shape)) * np.dtype(_STORAGE[self.dtype][1]).itemsize

    def save_progress(self) -> None:
        save_json({"fingerprint": self.fingerprint, "rows_done": self.done, "rows_written": self.written,
                   "crc32": self.crc, "skipped": self.skipped}, self.sidecar)


def _extract_once(job: _Extraction, encoder, dataset: ImageDataset) -> None:
    """Extract into job.path unless another process did meanwhile: one extractor per file; the others (e.g.
    distributed ranks) wait on the lock, then find the finished file."""
    os.makedirs(os.path.dirname(job.path), exist_ok=True)
    with open(job.path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(job.path):
                _resume_or_start(job)
                _encode_rows(job, encoder, dataset)
                _finish(job)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        os.remove(job.path + ".lock")
    except FileNotFoundError:
        pass


def _saved_progress(job: _Extraction) -> dict | None:
    """The sidecar's record of an interrupted extraction, when it and the partial file fit this one."""
    try:
        with open(job.sidecar, encoding="utf-8") as f:
            state = json.load(f)
        done = int(state["rows_done"])
        fits = (read_cache_header(job.partial).get("fingerprint") == job.fingerprint
                and os.path.getsize(job.partial) >= job.data_end and state.get("fingerprint") == job.fingerprint
                and 0 <= done <= len(job.rows)
                and int(state.get("rows_written", done)) + len(state.get("skipped", [])) == done)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if fits else None


def _resume_or_start(job: _Extraction) -> None:
    """Continue an interrupted extraction whose partial file and sidecar fit this one; else start a new partial file
    (header, then a data area of zeros)."""
    if os.path.exists(job.partial) and os.path.exists(job.sidecar):
        state = _saved_progress(job)
        if state is not None:
            job.done, job.crc = int(state["rows_done"]), int(state["crc32"])
            job.written, job.skipped = int(state.get("rows_written", job.done)), list(state.get("skipped", []))
            if job.skipped and not job.skip_bad:
                raise FeatureCacheError(f"the interrupted extraction {job.partial!r} left out {len(job.skipped)} "
                                        f"undecodable image(s) ({_skipped_text(job.skipped)}); rerun with "
                                        "--skip-bad-images (skip_bad_images=True) to finish it, or delete it and its "
                                        ".progress file to start over")
            print(f"feature cache: resuming interrupted extraction at row {job.done}/{len(job.rows)} ({job.partial})",
                  file=sys.stderr)
            return
        print(f"feature cache: discarding an unusable partial file {job.partial}", file=sys.stderr)
    with open(job.partial, "wb") as f:
        f.write(_pack_header({"fingerprint": job.fingerprint, "complete": False}))
        f.truncate(job.data_end)
    job.save_progress()


@contextmanager
def _on_device(encoder, device):
    """The encoder on `device` inside the block: one living elsewhere is moved there and back home afterwards."""
    first = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
    home = first.device if first is not None else None
    moved = home is not None and home != torch.device(device)
    if moved:
        encoder.to(device)
    try:
        yield
    finally:
        if moved:
            encoder.to(home)


def _encode_rows(job: _Extraction, encoder, dataset: ImageDataset) -> None:
    """Encode the rows from job.done on, batch by batch: each batch's features go to the partial file, then its
    progress to the sidecar."""
    out = _open_memmap(job.partial, _STORAGE[job.dtype][1], job.shape, "r+")
    bar = Progress(len(job.rows), f"extracting {job.fingerprint['encoder.model']} features "
                                  f"({job.fingerprint['dataset.split']}, {job.image_size}px)", job.progress,
                   initial=job.done)
    try:
        with torch.no_grad(), _on_device(encoder, job.device):
            for start in range(job.done, len(job.rows), job.encoder_batch):
                idx = job.rows[start:start + job.encoder_batch]
                images = _read_batch(job, dataset, start, idx)
                if images.shape[0]:
                    feats = encoder(images.to(job.device))
                    if tuple(feats.shape) != (images.shape[0], job.feature_dim):
                        raise RuntimeError(f"encoder returned shape {tuple(feats.shape)}, expected "
                                           f"{(images.shape[0], job.feature_dim)}")
                    _write_rows(job, out, feats.to(job.dtype), f"rows {start}..{start + len(idx) - 1}")
                job.done = start + len(idx)
                job.save_progress()
                bar.update(len(idx))
    finally:
        bar.close()


def _read_batch(job: _Extraction, dataset: ImageDataset, start: int, idx: np.ndarray) -> Tensor:
    """The images of dataset rows `idx` (positions start.. of the rows asked for); with skip_bad, those that decode,
    the others named in a warning and recorded in job.skipped."""
    if job.skip_bad:
        images, bad = dataset.images_skipping_bad(idx, job.image_size)
    else:
        try:
            images, bad = dataset.images(idx, job.image_size), []
        except BadImageError as err:
            raise BadImageError(err.row, err.path, err.reason,
                                f"; rerun with --skip-bad-images (skip_bad_images=True) to leave undecodable images "
                                f"out: the extraction resumes at row {start} of {len(job.rows)}") from None
    bad = {err.row: err for err in bad}
    for j, r in enumerate(idx.tolist()):
        if r in bad:
            job.skipped.append({"index": start + j, "row": r, "path": bad[r].path, "error": bad[r].reason})
            print(f"warning: skipping undecodable image {bad[r].path!r}: {bad[r].reason}", file=sys.stderr,
                  flush=True)
    return images


def _write_rows(job: _Extraction, out: np.memmap, feats: Tensor, what: str) -> None:
    """Append feature rows (in the storage dtype) after the ones written, on disk before the sidecar says so."""
    if not bool(torch.isfinite(feats).all()):
        raise FeatureCacheError(f"features of {what} are not finite in {job.fingerprint['dtype']} (overflow?); try "
                                "dtype=torch.bfloat16 or float32")
    block = feats.cpu()
    block = block.view(torch.uint16) if job.dtype == torch.bfloat16 else block
    k = block.shape[0]
    out[job.written:job.written + k] = block.numpy()
    job.crc = zlib.crc32(memoryview(np.ascontiguousarray(out[job.written:job.written + k])).cast("B"), job.crc)
    job.written += k
    out.flush()


def _finish(job: _Extraction) -> None:
    """Complete the partial file and rename it into place: the rows left out listed as JSON after the data area
    (the header holds its offset, size and crc32), then the header with the completion marker."""
    if job.written == 0:
        first = job.skipped[0]
        raise BadImageError(first["row"], first["path"], first["error"],
                            f"; none of the {len(job.rows)} images could be decoded")
    header = {"fingerprint": job.fingerprint, "complete": True, "crc32": job.crc, "rows": job.written}
    listing = json.dumps(job.skipped).encode()
    if job.skipped:
        header |= {"skipped_images": len(job.skipped), "skipped_offset": job.data_end, "skipped_bytes": len(listing),
                   "skipped_crc32": zlib.crc32(listing)}
    with open(job.partial, "r+b") as f:
        if job.skipped:
            f.seek(job.data_end)
            f.write(listing)
            f.truncate()
            f.seek(0)
        f.write(_pack_header(header))
        f.flush()
        os.fsync(f.fileno())
    os.replace(job.partial, job.path)
    os.remove(job.sidecar)
