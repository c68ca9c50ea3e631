"""Labelled image datasets: IDX files (Fashion-MNIST, MNIST) and ImageFolder trees, opened by `open_dataset`.

Every dataset hands out float images in [0, 1], shape (k, 3, size, size), at a resolution the caller chooses, and a
fingerprint of what determines them (the feature cache, clpdd_fast/feature_cache.py, keys its files on it).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clpdd_fast import validation as check

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "test", "valid": "test", "validation": "test",
                  "test": "test", "t10k": "test"}


def digest(*parts) -> str:
    """A 32-hex-digit sha256 of the parts (bytes as they are, anything else as its str), separated by NUL."""
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
        return self.labels.numel()   # labels is 1-D

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
        check.integer("size", size, minimum=1)
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
                "content": self._content_id(), "labels_sha256": digest(self.labels.numpy().astype("<i8").tobytes())}

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
        return "files:" + digest("\n".join(self.paths)) + ";dir-mtimes:" + digest(mtimes)


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
