"""Image datasets (IDX files such as Fashion-MNIST, ImageFolder trees) and the on-disk real-feature cache.

Datasets hand out float images in [0, 1], shape (k, 3, size, size), at a resolution the caller chooses.
`load_or_extract_features` runs a frozen encoder over a dataset once and keeps the features in a memory-mapped file
whose header fingerprints everything that determines them (encoder, weights, dataset, split, rows, resolution,
preprocessing, dtype); a file that does not match is never used silently (FeatureCacheError).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import fcntl
import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clpdd_fast.artifacts import save_json

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "test", "valid": "test", "validation": "test",
                  "test": "test", "t10k": "test"}


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, (bytes, bytearray, memoryview)) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class BadImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image). row: its dataset row; path: the file."""

    def __init__(self, row: int, path: str, reason: str, hint: str = ""):
        super().__init__(f"data: cannot decode image {path!r}: {reason}{hint}")
        self.row, self.path, self.reason = row, path, reason


def _canonical_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
    return _SPLIT_ALIASES[split]


class ImageDataset:
    """A labelled image set handing out (k, 3, size, size) float images in [0, 1].

    Attributes: labels (LongTensor (N,)), num_classes (int), class_names (list[str]), root (absolute path),
    split (str), preprocessing (str: how images become size x size), fingerprint (dict of str).
    Subclasses implement `_load(indices: np.ndarray, size: int) -> Tensor`.
    """

    kind = "abstract"
    labels: Tensor
    num_classes: int
    class_names: list
    root: str
    split: str
    preprocessing: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, indices, size: int) -> Tensor:
        """indices: ints / 1-D array / LongTensor of rows; size: output side. -> float32 (k, 3, size, size) in [0, 1].
        A file that cannot be decoded raises BadImageError."""
        idx = self._rows(indices, size)
        if idx.size == 0:
            return torch.empty(0, 3, size, size)
        return self._load(idx, size)

    def images_skipping_bad(self, indices, size: int) -> tuple[Tensor, list]:
        """images() of the rows that decode, in order, and a BadImageError (.row, .path) for each row that does not.
        Only datasets read from image files have such rows."""
        return self.images(indices, size), []

    def _rows(self, indices, size: int) -> np.ndarray:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int, got {size!r}")
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices: values must lie in [0, {len(self)}), got range [{idx.min()}, {idx.max()}]")
        return np.where(idx < 0, idx + len(self), idx)

    def _load(self, indices: np.ndarray, size: int) -> Tensor:
        raise NotImplementedError

    def _content_id(self) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> dict:
        return {"kind": self.kind, "path": self.root, "split": self.split, "n": str(len(self)),
                "num_classes": str(self.num_classes), "preprocessing": self.preprocessing,
                "content": self._content_id(), "labels_sha256": _hash(self.labels.numpy().astype("<i8").tobytes())}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes})")


# ---------------------------------------------------------------------------------------------------------- IDX files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed, detected by content) into a numpy array (native byte order)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"data: cannot read IDX file {path!r}: {exc} (corrupt or truncated download?)") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"data: {path!r} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; "
                         "expected 0000 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"data: IDX file {path!r} has a truncated header")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"data: IDX file {path!r} has {len(raw)} bytes but its header (shape {shape}, {dtype}) "
                         f"implies {expected}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Write `array` as an IDX file; gzip-compressed when the path ends in .gz (used by tests and converters)."""
    arr = np.asarray(array)
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = _IDX_CODES.get(np.dtype(big.dtype))
    if code is None:
        raise TypeError(f"array: IDX cannot store dtype {arr.dtype}")
    data = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + big.tobytes()
    with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
        f.write(data)


def _find_idx(root: str, split: str, what: str) -> str | None:
    prefixes = ["train"] if split == "train" else ["t10k", "test"]
    ndim = 3 if what == "images" else 1
    for prefix in prefixes:
        for sep in ("-", "."):
            for ext in ("", ".gz"):
                p = os.path.join(root, f"{prefix}-{what}{sep}idx{ndim}-ubyte{ext}")
                if os.path.isfile(p):
                    return p
    return None


class IdxDataset(ImageDataset):
    """Images and labels from IDX files (MNIST / Fashion-MNIST layout), held in memory as uint8 (N, H, W).

    Resizing: bilinear with antialiasing from HxW to size x size; grayscale repeated to 3 channels.
    Class names: a `classes.txt` next to the files (one per line), else Fashion-MNIST's or MNIST's when the folder
    name says so, else "0".."C-1".
    """

    kind = "idx"

    def __init__(self, root: str, split: str = "train"):
        self.root = os.path.abspath(root)
        self.split = _canonical_split(split)
        self.image_file = _find_idx(self.root, self.split, "images")
        self.label_file = _find_idx(self.root, self.split, "labels")
        if self.image_file is None or self.label_file is None:
            prefix = "train" if self.split == "train" else "t10k"
            raise FileNotFoundError(f"data: {self.root!r} has no {prefix}-images-idx3-ubyte[.gz] and "
                                    f"{prefix}-labels-idx1-ubyte[.gz] for split {split!r}")
        images = read_idx(self.image_file)
        labels = read_idx(self.label_file)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(f"data: {self.image_file!r} holds shape {images.shape}, expected (N, H, W) or (N, H, W, C)")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"data: {self.label_file!r} holds shape {labels.shape}, expected ({images.shape[0]},) "
                             f"to match {self.image_file!r}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"data: {self.label_file!r} contains negative labels")
        if images.dtype != np.uint8:
            raise ValueError(f"data: {self.image_file!r} holds {images.dtype} pixels, expected uint8")
        self._images = images if images.ndim == 4 else images[..., None]  # (N, H, W, C)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.class_names = self._class_names(int(labels.max()) + 1 if labels.size else 0)
        self.num_classes = len(self.class_names)
        self.preprocessing = "idx-uint8/255;resize-bilinear-antialias;gray-to-rgb-repeat"

    def _class_names(self, n_seen: int) -> list:
        txt = os.path.join(self.root, "classes.txt")
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
            if len(names) < n_seen:
                raise ValueError(f"data: {txt!r} names {len(names)} classes but the labels go up to {n_seen - 1}")
            return names
        base = os.path.basename(self.root.rstrip(os.sep)).lower()
        if "fashion" in base and n_seen <= 10:
            return list(FASHION_MNIST_CLASSES)
        if "mnist" in base and n_seen <= 10:
            return list(MNIST_CLASSES)
        return [str(i) for i in range(n_seen)]

    def _load(self, indices: np.ndarray, size: int) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self._images[indices])).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return x.contiguous()

    def _content_id(self) -> str:
        files = [self.image_file, self.label_file]
        return ";".join(f"{os.path.basename(p)}:{os.path.getsize(p)}:{int(os.path.getmtime(p))}" for p in files)


# -------------------------------------------------------------------------------------------------------- ImageFolder
def _resolve_split_dir(root: str, split: str) -> str:
    names = ["train"] if split == "train" else (["val", "test", "validation"] if split == "test" else [split])
    for n in names:
        p = os.path.join(root, n)
        if os.path.isdir(p):
            return p
    raise FileNotFoundError(f"data: {root!r} has no {' or '.join(n + '/' for n in names)} folder for split "
                            f"{split!r} (expected train/<class>/* and val/<class>/* or test/<class>/*)")


class ImageFolderDataset(ImageDataset):
    """An ImageFolder split: `<root>/<split>/<class>/<image>`; class index = position of the class folder name in
    sorted order (taken from the train split so both splits agree); images sorted by file name within a class.

    Resizing: the shorter side to `size` (PIL bilinear, antialiased), then a centre crop to size x size; RGB.
    Images are decoded by `num_workers` threads (PIL releases the GIL while decoding).
    """

    kind = "imagefolder"

    def __init__(self, root: str, split: str = "train", num_workers: int | None = None):
        self.root = os.path.abspath(root)
        self.split = _canonical_split(split)
        self.split_dir = _resolve_split_dir(self.root, self.split)
        train_dir = _resolve_split_dir(self.root, "train") if self.split != "train" else self.split_dir
        self.class_names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"data: {train_dir!r} contains no class folders (expected train/<class>/<image>)")
        paths, labels = [], []
        for c, name in enumerate(self.class_names):
            cdir = os.path.join(self.split_dir, name)
            if not os.path.isdir(cdir):
                if self.split_dir == train_dir:
                    raise ValueError(f"data: class folder {cdir!r} vanished while scanning")
                continue  # a class absent from val/ simply has no test images
            files = sorted(e.name for e in os.scandir(cdir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise ValueError(f"data: class folder {cdir!r} contains no images (looked for "
                                 f"{', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
            paths += [os.path.join(name, f) for f in files]
            labels += [c] * len(files)
        extra = sorted(e.name for e in os.scandir(self.split_dir) if e.is_dir() and e.name not in self.class_names)
        if extra:
            raise ValueError(f"data: {self.split_dir!r} has class folder(s) {extra[:5]} that {train_dir!r} lacks")
        self.paths = paths  # relative to split_dir
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.class_names)
        self.num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        self.preprocessing = "pil-rgb;resize-shorter-bilinear;center-crop"

    def _load_one(self, i: int, size: int) -> Tensor:
        from PIL import Image

        path = os.path.join(self.split_dir, self.paths[i])
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = size / min(w, h)
                nw, nh = max(size, round(w * s)), max(size, round(h * s))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
            raise BadImageError(i, path, f"{exc} ({type(exc).__name__})") from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def _decode(self, indices: np.ndarray, size: int) -> list:
        """Per row: uint8 (3, size, size), or the BadImageError saying why its file does not decode."""
        def one(i):
            try:
                return self._load_one(int(i), size)
            except BadImageError as err:
                return err

        if self.num_workers > 1 and len(indices) > 1:
            with ThreadPoolExecutor(self.num_workers) as pool:
                return list(pool.map(one, indices))
        return [one(i) for i in indices]

    def _load(self, indices: np.ndarray, size: int) -> Tensor:
        imgs = self._decode(indices, size)
        for img in imgs:
            if isinstance(img, BadImageError):
                raise img
        return torch.stack(imgs).float().div_(255.0)

    def images_skipping_bad(self, indices, size: int) -> tuple[Tensor, list]:
        decoded = self._decode(self._rows(indices, size), size)
        good = [d for d in decoded if not isinstance(d, BadImageError)]
        bad = [d for d in decoded if isinstance(d, BadImageError)]
        return (torch.stack(good).float().div_(255.0) if good else torch.empty(0, 3, size, size)), bad

    def _content_id(self) -> str:
        if getattr(self, "_content", None) is None:
            self._content = self._compute_content_id()
        return self._content

    def _compute_content_id(self) -> str:
        # Cheap: the sorted file list plus the class folders' mtimes (adding/removing/renaming files changes them).
        mtimes = [int(os.path.getmtime(os.path.join(self.split_dir, n)))
                  for n in self.class_names if os.path.isdir(os.path.join(self.split_dir, n))]
        return "files:" + _hash("\n".join(self.paths)) + ";dir-mtimes:" + _hash(mtimes)


def open_dataset(path: str | None, split: str = "train") -> ImageDataset:
    """Open a dataset folder. path None -> the embedded default (Fashion-MNIST under /usr/share/datasets/fashion-mnist).

    A folder with IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-* for the test split)
    -> IdxDataset; a folder with train/<class>/* and val/<class>/* (or test/) -> ImageFolderDataset.
    split: "train", or "val" / "test" (synonyms).
    """
    split_c = _canonical_split(split)
    if path is None:
        if not os.path.isdir(DEFAULT_DATA):
            raise FileNotFoundError(f"data: the default dataset (Fashion-MNIST) is not installed at {DEFAULT_DATA}; "
                                    "install it with `sudo apt-get install dataset-fashion-mnist` (or `make demo`), "
                                    "or pass --data PATH")
        return IdxDataset(DEFAULT_DATA, split_c)
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"data: no such folder {path!r}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"data: {path!r} is a file; expected a folder of IDX files or an ImageFolder tree")
    if glob.glob(os.path.join(path, "*-idx[0-9]-ubyte*")):
        return IdxDataset(path, split_c)
    if os.path.isdir(os.path.join(path, "train")):
        return ImageFolderDataset(path, split_c)
    raise FileNotFoundError(f"data: {path!r} holds neither IDX files (train-images-idx3-ubyte[.gz], ...) nor an "
                            "ImageFolder tree (train/<class>/*, val/<class>/*)")


# ------------------------------------------------------------------------------------------------------ feature cache
CACHE_FORMAT = "clpdd-feature-cache-v1"
_MAGIC = b"CLPDDFEAT1\n"
_HEADER_BYTES = 4096  # fixed preamble: magic + JSON header padded with spaces; data starts page-aligned after it
_STORAGE = {torch.float16: ("float16", np.float16), torch.bfloat16: ("bfloat16", np.uint16),
            torch.float32: ("float32", np.float32)}


class FeatureCacheError(ValueError):
    """A feature-cache file exists but does not match what was asked for, or is corrupt."""


class _Progress:
    """Progress on stderr: tqdm when installed, else a line at most every 2 s."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.t0 = self.last = time.time()
        self.start = initial
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and (time.time() - self.last > 2 or self.n >= self.total):
            self.last = time.time()
            rate = (self.n - self.start) / max(self.last - self.t0, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} images ({rate:.0f}/s, eta {eta:.0f}s)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cache_fingerprint(encoder, dataset: ImageDataset, size: int, dtype: torch.dtype, indices=None) -> dict:
    """Everything that determines the cached features, as a dict of strings (shape included)."""
    if dtype not in _STORAGE:
        raise ValueError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    n = len(dataset) if indices is None else len(indices)
    rows = "all" if indices is None else "sha256:" + _hash(np.asarray(indices, dtype="<i8").tobytes())
    fp = {"format": CACHE_FORMAT, "size": str(size), "dtype": _STORAGE[dtype][0], "rows": rows,
          "shape": f"{n},{encoder.feature_dim}", "preprocessing": dataset.preprocessing + ";encoder-normalize"}
    fp.update({f"encoder.{k}": str(v) for k, v in encoder.fingerprint.items()})
    fp.update({f"dataset.{k}": str(v) for k, v in dataset.fingerprint.items()})
    return fp


def cache_path(cache_dir: str, fingerprint: dict) -> str:
    """File name: readable parts + a hash of the full fingerprint, so different settings never share a file."""
    h = _hash(json.dumps(fingerprint, sort_keys=True))[:16]
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


def _crc(arr: np.ndarray, crc: int = 0, chunk_rows: int = 65536) -> int:
    for s in range(0, arr.shape[0], chunk_rows):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(arr[s:s + chunk_rows])).cast("B"), crc)
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
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
    bar = _Progress(shape[0], f"extracting {expected['encoder.model']} features ({expected['dataset.split']}, "
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
